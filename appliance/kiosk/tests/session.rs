//! The session state machine in simulated time: every test feeds events at chosen instants and
//! compares the commands and screens that come out.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diffusionx_diffusion::NoiseLevel;
use diffusionx_kiosk::session::{
    BLOCKED_NOTICE, CloudFailure, Command, EMPTY_NOTICE, Ending, Event, Handover, LOCAL_ONLY,
    LONG_NOTICE, NON_FINITE_PREVIEW, PreviewFacts, Session, SessionConfig, TokenCounter,
};
use diffusionx_predictor::{LatentStats, Observation};
use diffusionx_ui::{Action, FinalPath, Key, RefineStatus, RgbImage, Screen};

fn image(v: u8) -> RgbImage {
    RgbImage::from_raw(2, 2, vec![v; 12]).unwrap()
}

struct Sim {
    session: Session,
    now: Instant,
}

impl Sim {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            session: Session::new(
                SessionConfig {
                    idle_timeout: Duration::from_secs(60),
                    preview_steps: 4,
                    noise_level: NoiseLevel::from_bp(4000).unwrap(),
                    base_seed: 7,
                    ..SessionConfig::default()
                },
                now,
            ),
            now,
        }
    }

    fn at(&mut self, secs: f64, event: Event) -> Vec<Command> {
        self.now += Duration::from_secs_f64(secs);
        self.session.handle(event, self.now)
    }

    fn act(&mut self, action: Action) -> Vec<Command> {
        self.at(0.1, Event::Action(action))
    }

    fn typed(&mut self, text: &str) {
        for c in text.chars() {
            let key = if c == ' ' { Key::Space } else { Key::Char(c) };
            assert_eq!(self.act(Action::Key(key)), vec![]);
        }
    }

    /// Runs preview `round` to the end after `secs`.
    fn preview_done(&mut self, round: u32, secs: f64, latent: f32) -> Vec<Command> {
        self.at(
            secs,
            Event::PreviewDone {
                round,
                image: image(round as u8),
                latent: vec![latent; 4],
                facts: Some(facts(round)),
            },
        )
    }
}

/// Round `round`'s predictor facts: its pooled embedding is `[round, 1]`.
fn facts(round: u32) -> PreviewFacts {
    PreviewFacts {
        pooled: vec![round as f32, 1.0],
        prompt_tokens: 3 + round,
        x0_change: 0.01 * round as f32,
        width: 256,
        height: 256,
        edge_steps: 4,
    }
}

fn start_preview(cmds: &[Command]) -> (u32, String, u64) {
    match cmds {
        [
            Command::StartPreview {
                round,
                prompt,
                seed,
                steps: 4,
            },
        ] => (*round, prompt.clone(), *seed),
        other => panic!("expected one StartPreview, got {other:?}"),
    }
}

#[test]
fn three_rounds_then_finalize_in_the_cloud() {
    let mut sim = Sim::new();
    assert!(matches!(sim.session.screen(), Screen::Attract { .. }));
    assert_eq!(sim.act(Action::StartSession), vec![]);
    sim.typed("red fox");
    let (round, prompt, seed) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!((round, prompt.as_str()), (1, "red fox"));

    // Live progress shows on the generating screen.
    sim.at(
        0.5,
        Event::PreviewStep {
            round: 1,
            step: 2,
            total: 4,
            image: image(9),
        },
    );
    match sim.session.screen() {
        Screen::Generating {
            step,
            total,
            preview,
            ..
        } => assert_eq!((step, total, preview), (2, 4, Some(image(9)))),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.preview_done(1, 1.5, 1.0), vec![]);
    assert!(matches!(
        sim.session.screen(),
        Screen::Preview { round: 1, .. }
    ));

    // Round 2: edit the prompt; the seed stays.
    assert_eq!(sim.act(Action::EditPrompt), vec![]);
    for _ in 0..3 {
        sim.act(Action::Key(Key::Backspace));
    }
    sim.typed("cat");
    let (round, prompt, seed2) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!((round, prompt.as_str(), seed2), (2, "red cat", seed));
    sim.preview_done(2, 2.0, 2.0);

    // Round 3: same prompt, new seed.
    let (round, prompt, seed3) = start_preview(&sim.act(Action::NewSeed));
    assert_eq!((round, prompt.as_str()), (3, "red cat"));
    assert_ne!(seed3, seed);
    sim.preview_done(3, 1.0, 3.0);

    // Finalize: the record is saved before the cloud is asked, with the last latent.
    let cmds = sim.act(Action::Finalize);
    // The predictor sees the final round's facts and the round before's embedding.
    let handover = Handover {
        prompt: "red cat".into(),
        seed: seed3,
        noise_level: NoiseLevel::from_bp(4000).unwrap(),
        latent: vec![3.0; 4],
        observation: Some(Observation {
            pooled: vec![3.0, 1.0],
            previous_pooled: Some(vec![2.0, 1.0]),
            prompt_tokens: 6,
            rounds: 3,
            latent: LatentStats {
                mean: 3.0,
                std: 0.0,
            },
            x0_change: 0.03,
            width: 256,
            height: 256,
            edge_steps: 4,
        }),
    };
    match &cmds[..] {
        [Command::SaveRecord(record), Command::RefineInCloud(h)] => {
            assert_eq!(record.rounds.len(), 3);
            assert_eq!(h, &handover);
        }
        other => panic!("{other:?}"),
    }
    // The level the cloud is asked for after the load probe is the one recorded, durably.
    let cmds = sim.at(
        0.1,
        Event::CloudDecided {
            noise_level: NoiseLevel::from_bp(2600).unwrap(),
            predictor: None,
            predictor_error: None,
        },
    );
    assert!(matches!(&cmds[..], [Command::SaveRecord(r)]
        if r.noise_level == NoiseLevel::from_bp(2600)));
    sim.at(
        0.1,
        Event::CloudQueued {
            position: 1,
            wait_ms: 900,
        },
    );
    assert!(matches!(
        sim.session.screen(),
        Screen::Refining {
            status: RefineStatus::Queued {
                position: 1,
                wait_ms: 900
            },
            ..
        }
    ));
    sim.at(1.0, Event::CloudStep { step: 3, total: 4 });
    assert!(matches!(
        sim.session.screen(),
        Screen::Refining {
            status: RefineStatus::Cloud { step: 3, total: 4 },
            ..
        }
    ));
    assert_eq!(sim.session.record().cloud_steps, Some(4));
    assert_eq!(sim.at(1.0, Event::CloudDone { image: image(42) }), vec![]);
    assert_eq!(
        sim.session.screen(),
        Screen::Final {
            image: image(42),
            path: FinalPath::Cloud
        }
    );
    sim.act(Action::ThumbsUp);

    // New picture: the session is reported and a new one starts with an empty prompt.
    let cmds = sim.act(Action::NewPicture);
    let record = match &cmds[..] {
        [Command::Report(record)] => record.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(record.number, 1);
    assert_eq!(record.ending, Ending::Finished);
    assert_eq!(record.path, Some(FinalPath::Cloud));
    assert_eq!(record.thumbs_up, Some(true));
    assert_eq!(record.noise_level, NoiseLevel::from_bp(2600));
    assert_eq!(record.refine_ms, Some(2200));
    let times: Vec<Option<u64>> = record.rounds.iter().map(|r| r.preview_ms).collect();
    assert_eq!(times, vec![Some(2000), Some(2000), Some(1000)]);
    assert!(matches!(
        sim.session.screen(),
        Screen::PromptEntry { ref text, .. } if text.is_empty()
    ));
    assert_eq!(sim.session.record().number, 2);
}

#[test]
fn typing_during_a_preview_cancels_it_and_edits() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("moon");
    start_preview(&sim.act(Action::Key(Key::Done)));
    let cmds = sim.act(Action::Key(Key::Char('s')));
    assert_eq!(cmds, vec![Command::CancelPreview { round: 1 }]);
    assert_eq!(sim.session.prompt(), "moons");
    // The cancelled round's late result is ignored.
    assert_eq!(sim.preview_done(1, 0.5, 1.0), vec![]);
    assert!(matches!(sim.session.screen(), Screen::PromptEntry { .. }));
    let (round, prompt, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!((round, prompt.as_str()), (2, "moons"));
    assert_eq!(sim.session.record().rounds[0].preview_ms, None);
}

#[test]
fn shift_capitalizes_one_letter_and_clear_empties() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.act(Action::Key(Key::Shift));
    sim.typed("éa");
    assert_eq!(sim.session.prompt(), "Éa");
    sim.act(Action::Key(Key::Clear));
    assert_eq!(sim.session.prompt(), "");
    // An empty prompt does not start a preview.
    assert_eq!(sim.act(Action::Key(Key::Done)), vec![]);
}

#[test]
fn the_cloud_failing_falls_back_to_local_and_says_so() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("tree");
    sim.act(Action::Key(Key::Done));
    sim.preview_done(1, 1.0, 0.5);
    let cmds = sim.act(Action::Finalize);
    // One round: no previous embedding to compare with.
    assert!(matches!(&cmds[..], [_, Command::RefineInCloud(h)]
        if h.observation.as_ref().unwrap().previous_pooled.is_none()));
    sim.at(
        0.1,
        Event::CloudDecided {
            noise_level: NoiseLevel::from_bp(7000).unwrap(),
            predictor: None,
            predictor_error: Some("why".into()),
        },
    );
    let cmds = sim.at(
        0.2,
        Event::CloudFailed(CloudFailure::Unreachable("connection lost".into())),
    );
    // The kiosk redoes its configured share, and the record says so.
    assert!(matches!(&cmds[..], [Command::RefineLocally(h)]
        if h.latent == vec![0.5; 4] && h.noise_level.bp() == 4000));
    assert_eq!(sim.session.record().noise_level, NoiseLevel::from_bp(4000));
    assert_eq!(sim.session.record().predictor_error.as_deref(), Some("why"));
    assert!(matches!(
        sim.session.screen(),
        Screen::Refining {
            status: RefineStatus::Local { .. },
            ..
        }
    ));
    // A second failure report (e.g. the deadline after the drop) does not start a second run.
    assert_eq!(
        sim.at(0.1, Event::CloudFailed(CloudFailure::Deadline)),
        vec![]
    );
    sim.at(1.0, Event::LocalStep { step: 1, total: 2 });
    sim.at(1.0, Event::LocalDone { image: image(5) });
    assert_eq!(
        sim.session.screen(),
        Screen::Final {
            image: image(5),
            path: FinalPath::Local
        }
    );
    assert_eq!(
        sim.session.record().fallback_reason.as_deref(),
        Some("unreachable: connection lost")
    );
    // The visitor walks away: the next one sees the picture on the attract screen, no prompt.
    let cmds = sim.at(61.0, Event::Tick);
    assert!(matches!(&cmds[..], [Command::Report(r)] if r.ending == Ending::Finished));
    assert_eq!(
        sim.session.screen(),
        Screen::Attract {
            hint: "Touch the screen to make a picture".into(),
            last: Some(image(5))
        }
    );
}

#[test]
fn a_failed_preview_is_reported_as_failed() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("x");
    sim.act(Action::Key(Key::Done));
    sim.at(
        0.5,
        Event::PreviewFailed {
            round: 1,
            message: "out of memory".into(),
        },
    );
    assert_eq!(
        sim.session.screen(),
        Screen::Error {
            title: "The preview did not work".into(),
            message: "out of memory".into()
        }
    );
    let cmds = sim.act(Action::StartOver);
    match &cmds[..] {
        [Command::Report(r)] => assert_eq!(r.ending, Ending::Failed),
        other => panic!("{other:?}"),
    }
    assert!(matches!(sim.session.screen(), Screen::PromptEntry { .. }));
}

#[test]
fn an_idle_visitor_is_timed_out_and_the_prompt_cleared() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("secret wish");
    let deadline = sim.session.next_deadline().unwrap();
    assert_eq!(deadline, sim.now + Duration::from_secs(60));
    // Not yet.
    assert_eq!(sim.at(59.0, Event::Tick), vec![]);
    let cmds = sim.at(1.0, Event::Tick);
    match &cmds[..] {
        [Command::Report(record)] => {
            assert_eq!(record.ending, Ending::Abandoned);
            assert_eq!(record.rounds.len(), 0);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(sim.session.screen(), Screen::Attract { .. }));
    assert_eq!(sim.session.prompt(), "");
    assert_eq!(sim.session.next_deadline(), None);
    // The next visitor starts fresh, with another seed.
    let seed1 = sim.session.seed();
    sim.act(Action::StartSession);
    assert!(
        matches!(sim.session.screen(), Screen::PromptEntry { ref text, .. } if text.is_empty())
    );
    assert_ne!(sim.session.seed(), seed1);
}

#[test]
fn no_timeout_while_the_kiosk_works() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("slow");
    sim.act(Action::Key(Key::Done));
    assert_eq!(sim.session.next_deadline(), None);
    assert_eq!(sim.at(600.0, Event::Tick), vec![]);
    assert!(matches!(sim.session.screen(), Screen::Generating { .. }));
}

/// A visitor waiting for the cloud (or a local refinement) is not sent back to the attract
/// screen by the idle timer, however long the job takes.
#[test]
fn no_timeout_while_the_picture_is_refined() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("slow");
    sim.act(Action::Key(Key::Done));
    sim.preview_done(1, 1.0, 0.5);
    let cmds = sim.act(Action::Finalize);
    assert!(matches!(
        &cmds[..],
        [Command::SaveRecord(_), Command::RefineInCloud(_)]
    ));
    assert_eq!(sim.session.next_deadline(), None);
    assert_eq!(sim.at(600.0, Event::Tick), vec![]);
    assert!(matches!(sim.session.screen(), Screen::Refining { .. }));
    sim.at(1.0, Event::CloudDone { image: image(42) });
    assert_eq!(
        sim.session.screen(),
        Screen::Final {
            image: image(42),
            path: FinalPath::Cloud
        }
    );
}

/// A preview whose latent holds NaN (a broken model, an overflow) fails the round: nothing is
/// left to finalize, so neither the cloud nor a local refinement gets the broken latent.
#[test]
fn a_non_finite_preview_latent_fails_the_round() {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut sim = Sim::new();
        sim.act(Action::StartSession);
        sim.typed("fox");
        sim.act(Action::Key(Key::Done));
        assert_eq!(sim.preview_done(1, 1.0, bad), vec![]);
        assert_eq!(
            sim.session.screen(),
            Screen::Error {
                title: "The preview did not work".into(),
                message: NON_FINITE_PREVIEW.into(),
            }
        );
        assert_eq!(sim.session.record().ending, Ending::Failed);
        assert_eq!(sim.act(Action::Finalize), vec![], "nothing to finalize");
    }
}

/// A prompt the model would read only in part (over 77 CLIP tokens) is refused with a notice:
/// the preview would drop its end and the gateway would refuse it at finalize.
#[test]
fn a_prompt_over_the_token_limit_is_refused_with_a_notice() {
    let now = Instant::now();
    // One token per word, plus the start and end tokens.
    let words = TokenCounter(Arc::new(|p: &str| Some(p.split_whitespace().count() + 2)));
    let session = Session::new(
        SessionConfig {
            prompt_tokens: Some(words),
            ..SessionConfig::default()
        },
        now,
    );
    let mut sim = Sim { session, now };
    sim.act(Action::StartSession);
    sim.typed(&"fox ".repeat(76));
    assert_eq!(sim.act(Action::Key(Key::Done)), vec![], "77 + 2 tokens");
    assert!(matches!(
        sim.session.screen(),
        Screen::PromptEntry { notice: Some(ref n), .. } if n == LONG_NOTICE
    ));
    // 75 words (77 tokens) fit.
    sim.act(Action::Key(Key::Backspace));
    sim.act(Action::Key(Key::Backspace));
    sim.act(Action::Key(Key::Backspace));
    sim.act(Action::Key(Key::Backspace));
    assert_eq!(sim.session.prompt().split_whitespace().count(), 75);
    let (round, prompt, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!((round, prompt.split_whitespace().count()), (1, 75));
    assert_eq!(sim.session.record().rounds.len(), 1);
}

#[test]
fn a_leading_or_repeated_space_is_ignored_so_the_box_shows_the_text() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed(" ");
    assert_eq!(sim.session.prompt(), "", "no leading space");
    sim.typed("fox  in   snow ");
    assert_eq!(sim.session.prompt(), "fox in snow ");
    // A whitespace character from a physical keyboard counts as a space too.
    sim.act(Action::Key(Key::Char('\u{a0}')));
    assert_eq!(sim.session.prompt(), "fox in snow ");
    // Every Backspace removes something the visitor can see.
    sim.act(Action::Key(Key::Backspace));
    assert_eq!(sim.session.prompt(), "fox in snow");
}

#[test]
fn preview_on_a_blank_prompt_says_so_and_starts_nothing() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed(" ");
    assert_eq!(sim.act(Action::Key(Key::Done)), vec![], "no preview starts");
    let Screen::PromptEntry { notice, text, .. } = sim.session.screen() else {
        panic!("still editing")
    };
    assert_eq!(notice.as_deref(), Some(EMPTY_NOTICE));
    assert_eq!(text, "");
    // The next key clears the notice.
    sim.typed("f");
    let Screen::PromptEntry { notice, text, .. } = sim.session.screen() else {
        panic!("still editing")
    };
    assert_eq!((notice, text.as_str()), (None, "f"));
}

#[test]
fn a_blocked_prompt_is_refused_with_a_notice_until_the_next_key() {
    let mut sim = Sim::new();
    sim.session.config_mut().blocklist = vec!["gore".into()];
    sim.act(Action::StartSession);
    sim.typed("a GORE scene");
    assert_eq!(sim.act(Action::Key(Key::Done)), vec![], "no preview starts");
    let Screen::PromptEntry { notice, text, .. } = sim.session.screen() else {
        panic!("still editing")
    };
    assert_eq!(notice.as_deref(), Some(BLOCKED_NOTICE));
    assert_eq!(text, "a GORE scene", "the prompt stays for editing");
    assert_eq!(sim.session.record().blocked_prompts, 1);
    // The next key clears the notice; an allowed prompt starts a round.
    sim.act(Action::Key(Key::Clear));
    let Screen::PromptEntry { notice, .. } = sim.session.screen() else {
        panic!("still editing")
    };
    assert_eq!(notice, None);
    sim.typed("a gorgeous scene");
    let (round, prompt, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!((round, prompt.as_str()), (1, "a gorgeous scene"));
    assert_eq!(sim.session.record().blocked_prompts, 1);
}

#[test]
fn operator_settings_apply_to_the_next_round() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("fox");
    sim.session.config_mut().preview_steps = 9;
    let commands = sim.act(Action::Key(Key::Done));
    assert!(
        matches!(
            commands.as_slice(),
            [Command::StartPreview { steps: 9, .. }]
        ),
        "{commands:?}"
    );
}

#[test]
fn a_late_preview_of_the_previous_visitor_is_not_taken_for_the_next_ones() {
    let mut sim = Sim::new();
    sim.act(Action::StartSession);
    sim.typed("first visitor");
    let (first, _, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    // They edit (cancelling the preview) and walk away.
    assert_eq!(
        sim.act(Action::EditPrompt),
        vec![Command::CancelPreview { round: first }]
    );
    assert!(matches!(
        &sim.at(61.0, Event::Tick)[..],
        [Command::Report(_)]
    ));
    // The next visitor's first round is another preview, with a number never used before.
    sim.act(Action::StartSession);
    sim.typed("second visitor");
    let (second, prompt, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    assert_eq!(prompt, "second visitor");
    assert_ne!(second, first);
    // The first visitor's preview finished before it saw the cancel: its picture is not shown.
    assert_eq!(sim.preview_done(first, 0.5, 1.0), vec![]);
    assert!(
        matches!(sim.session.screen(), Screen::Generating { round: 1, .. }),
        "the visitor still sees their first round being made"
    );
    assert_eq!(sim.preview_done(second, 0.5, 2.0), vec![]);
    match sim.session.screen() {
        Screen::Preview {
            image: shown,
            round,
            ..
        } => {
            assert_eq!((shown, round), (image(second as u8), 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_gateway_every_picture_is_refined_locally_and_that_is_no_fallback() {
    let mut sim = Sim::new();
    sim.session.config_mut().gateway = false;
    sim.act(Action::StartSession);
    sim.typed("tree");
    let (round, _, _) = start_preview(&sim.act(Action::Key(Key::Done)));
    sim.preview_done(round, 1.0, 0.5);
    let cmds = sim.act(Action::Finalize);
    // No cloud to try: straight to the kiosk's own refinement, the record saved first.
    match &cmds[..] {
        [Command::SaveRecord(record), Command::RefineLocally(h)] => {
            assert_eq!(record.fallback_reason.as_deref(), Some(LOCAL_ONLY));
            assert_eq!((h.latent.clone(), h.noise_level.bp()), (vec![0.5; 4], 4000));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        sim.session.screen(),
        Screen::Refining {
            status: RefineStatus::Local { .. },
            ..
        }
    ));
    sim.at(1.0, Event::LocalDone { image: image(5) });
    let cmds = sim.act(Action::NewPicture);
    match &cmds[..] {
        [Command::Report(r)] => {
            assert_eq!(r.path, Some(FinalPath::Local));
            assert_eq!(r.fallback_reason.as_deref(), Some("local-only"));
            assert_eq!(r.ending, Ending::Finished);
        }
        other => panic!("{other:?}"),
    }
}
