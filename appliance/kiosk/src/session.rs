//! The visitor session as a pure state machine: events in, commands out, `now` passed in.
//!
//! No clock, no threads, no I/O: the kiosk shell feeds it taps, key presses and what the edge
//! engine and the cloud report, executes the commands it returns, renders [`Session::screen`]
//! and calls [`Session::handle`] with [`Event::Tick`] at [`Session::next_deadline`]. Tests drive
//! it in simulated time.

use std::time::{Duration, Instant};

use diffusionx_diffusion::NoiseLevel;
use diffusionx_fleet::PredictorReport;
use diffusionx_predictor::{Observation, latent_stats};
use diffusionx_ui::{Action, FinalPath, Key, RefineStatus, RgbImage, Screen};

/// What the session needs to know, fixed for the kiosk's lifetime.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Back to the attract screen (prompt cleared) after this long without input.
    pub idle_timeout: Duration,
    /// Edge denoising steps per preview.
    pub preview_steps: u16,
    /// Noise level the cloud re-noises the preview to when the operator fixes it, and of a
    /// local refinement.
    pub noise_level: NoiseLevel,
    /// The first seed; each session derives its own from it and the session count.
    pub base_seed: u64,
    /// Text of the attract screen.
    pub hint: String,
    /// Longest prompt, in bytes (the wire protocol's limit).
    pub max_prompt_bytes: usize,
    /// Words a prompt may not contain (whole words, any case; operators set it over MQTT).
    pub blocklist: Vec<String>,
    /// Whether the kiosk has a gateway. Without one every picture is refined locally from the
    /// start, reported with the reason [`LOCAL_ONLY`]: that is the design, not a fallback.
    pub gateway: bool,
    /// Counts a prompt's CLIP tokens (start and end included), when the kiosk has the model's
    /// tokenizer: a prompt over the protocol's limit (77) is refused with [`LONG_NOTICE`]
    /// instead of being cut short in the preview and refused by the gateway at finalize.
    pub prompt_tokens: Option<TokenCounter>,
}

/// A prompt's CLIP token count (`None` when it cannot be counted: the prompt is let through).
#[derive(Clone)]
pub struct TokenCounter(pub std::sync::Arc<CountTokens>);

/// What a [`TokenCounter`] calls.
pub type CountTokens = dyn Fn(&str) -> Option<usize> + Send + Sync;

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCounter")
    }
}

/// The most CLIP tokens a prompt may take, start and end tokens included (the wire protocol's
/// limit, CLIP's context).
pub const MAX_PROMPT_TOKENS: usize = 77;

pub use diffusionx_fleet::payload::LOCAL_ONLY;

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(90),
            preview_steps: 4,
            noise_level: NoiseLevel::from_bp(5000).expect("0.5 is a noise level"),
            base_seed: 0x5eed,
            hint: "Touch the screen to make a picture".into(),
            max_prompt_bytes: 1024,
            blocklist: Vec::new(),
            gateway: true,
            prompt_tokens: None,
        }
    }
}

/// Why the cloud path was given up for local refinement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudFailure {
    /// The gateway could not be reached (or the connection dropped mid-job).
    Unreachable(String),
    /// The gateway refused the job for load (`Busy`) or is shutting down.
    Busy,
    /// No result before the deadline.
    Deadline,
    /// The gateway answered with an error.
    Refused(String),
}

impl CloudFailure {
    /// A short name for reports.
    pub fn reason(&self) -> String {
        match self {
            Self::Unreachable(why) => format!("unreachable: {why}"),
            Self::Busy => "busy".into(),
            Self::Deadline => "deadline".into(),
            Self::Refused(why) => format!("refused: {why}"),
        }
    }
}

/// Inputs.
#[derive(Debug, Clone)]
pub enum Event {
    /// The visitor touched a control (or pressed a physical key mapped to one).
    Action(Action),
    /// The edge engine finished step `step` of `total` of preview `round`.
    PreviewStep {
        /// The preview's number ([`Command::StartPreview`]).
        round: u32,
        /// Steps done.
        step: u16,
        /// Steps in all.
        total: u16,
        /// The live preview.
        image: RgbImage,
    },
    /// Preview `round` is done.
    PreviewDone {
        /// The preview's number.
        round: u32,
        /// The decoded preview.
        image: RgbImage,
        /// The final latent (scaled), `[4, h, w]`.
        latent: Vec<f32>,
        /// What the noise level predictor needs of it (`None` if it could not be measured).
        facts: Option<PreviewFacts>,
    },
    /// Preview `round` failed.
    PreviewFailed {
        /// The preview's number.
        round: u32,
        /// What went wrong.
        message: String,
    },
    /// The gateway's answer to the load probe sent before the job.
    CloudLoad {
        /// Jobs waiting there.
        queue_depth: u32,
        /// Its estimate of the wait before a job sent now starts.
        expected_wait_ms: u32,
    },
    /// The noise level was chosen for the cloud job (after the load probe).
    CloudDecided {
        /// The level sent.
        noise_level: NoiseLevel,
        /// The predictor's inputs and decision (`None`: the operator fixed the level, or the
        /// predictor could not decide).
        predictor: Option<Box<PredictorReport>>,
        /// Why the predictor could not decide, if it could not.
        predictor_error: Option<String>,
    },
    /// The cloud job waits at `position`.
    CloudQueued {
        /// Jobs ahead.
        position: u32,
        /// The gateway's estimate.
        wait_ms: u32,
    },
    /// The cloud job ran a step.
    CloudStep {
        /// Steps done.
        step: u16,
        /// Steps in all.
        total: u16,
    },
    /// The cloud result.
    CloudDone {
        /// The refined picture.
        image: RgbImage,
    },
    /// The cloud path failed; the session falls back to local refinement.
    CloudFailed(CloudFailure),
    /// The local refinement ran a step.
    LocalStep {
        /// Steps done.
        step: u16,
        /// Steps in all.
        total: u16,
    },
    /// The local refinement's result.
    LocalDone {
        /// The refined picture.
        image: RgbImage,
    },
    /// The local refinement failed too.
    LocalFailed {
        /// What went wrong.
        message: String,
    },
    /// Time passed (call at [`Session::next_deadline`]).
    Tick,
}

/// What the edge engine measured of a finished preview for the noise level predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewFacts {
    /// The prompt's pooled text embedding.
    pub pooled: Vec<f32>,
    /// The prompt's length in CLIP tokens.
    pub prompt_tokens: u32,
    /// How much the predicted clean latent still changed over the last steps.
    pub x0_change: f32,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Denoising steps run.
    pub edge_steps: u32,
}

/// What the refinement works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Handover {
    /// The final prompt.
    pub prompt: String,
    /// The session's seed.
    pub seed: u64,
    /// How much of the preview to redo when the operator fixed it, or the cloud could not be
    /// asked (local refinement).
    pub noise_level: NoiseLevel,
    /// The last preview's latent.
    pub latent: Vec<f32>,
    /// The request as the noise level predictor sees it (`None` if the preview's facts could
    /// not be measured: the fixed level is used).
    pub observation: Option<Observation>,
}

/// Outputs, to be executed in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run a preview on the edge engine.
    StartPreview {
        /// The preview's number (1-based), counted over the kiosk's lifetime, not the
        /// session's round: events about it carry it, and a number is never reused.
        round: u32,
        /// The prompt.
        prompt: String,
        /// The seed.
        seed: u64,
        /// Denoising steps.
        steps: u16,
    },
    /// Stop preview `round` (the visitor changed the prompt).
    CancelPreview {
        /// The preview's number.
        round: u32,
    },
    /// Write the session record durably (before the network is touched).
    SaveRecord(SessionRecord),
    /// Send the latent to the gateway.
    RefineInCloud(Handover),
    /// Refine on this kiosk instead.
    RefineLocally(Handover),
    /// The session is over: report it.
    Report(SessionRecord),
}

/// One preview round, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    /// The prompt of this round.
    pub prompt: String,
    /// Its seed.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u16,
    /// Time from start to the finished preview (`None` if cancelled or failed).
    pub preview_ms: Option<u64>,
}

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Not yet.
    Open,
    /// A final picture was shown.
    Finished,
    /// The visitor walked away.
    Abandoned,
    /// Refinement failed on both paths.
    Failed,
}

/// What the kiosk records about a session (written before the network, reported at the end).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Sessions since start-up (1-based).
    pub number: u64,
    /// Every preview round.
    pub rounds: Vec<RoundRecord>,
    /// The noise level of the refinement: the predictor's for the cloud, the configured one
    /// for a local refinement.
    pub noise_level: Option<NoiseLevel>,
    /// The noise level predictor's inputs and decision, when it decided.
    pub predictor: Option<Box<PredictorReport>>,
    /// Why the predictor could not decide (the fixed level was sent).
    pub predictor_error: Option<String>,
    /// Cloud or local, once known.
    pub path: Option<FinalPath>,
    /// Denoising steps the gateway runs for this job, as its progress reports say.
    pub cloud_steps: Option<u16>,
    /// The gateway's load at finalize: (jobs waiting, expected wait in ms).
    pub cloud_load: Option<(u32, u32)>,
    /// Why the cloud was given up, if it was.
    pub fallback_reason: Option<String>,
    /// Finalize to final picture.
    pub refine_ms: Option<u64>,
    /// The visitor's verdict on the final picture.
    pub thumbs_up: Option<bool>,
    /// Prompts refused because of the blocklist.
    pub blocked_prompts: u32,
    /// How it ended.
    pub ending: Ending,
}

#[derive(Debug)]
enum State {
    Attract,
    Editing {
        shift: bool,
        pressed: Option<Key>,
    },
    Generating {
        /// The preview's number over the kiosk's lifetime (what the engine's events carry).
        preview: u32,
        started: Instant,
        step: u16,
        total: u16,
        image: Option<RgbImage>,
    },
    Previewing {
        image: RgbImage,
        latent: Vec<f32>,
        facts: Option<PreviewFacts>,
    },
    Refining {
        status: RefineStatus,
        image: RgbImage,
        handover: Handover,
        started: Instant,
    },
    Final {
        image: RgbImage,
        path: FinalPath,
    },
    Failed {
        title: String,
        message: String,
    },
}

/// The session state machine.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    prompt: String,
    seed: u64,
    /// This session's round (shown to the visitor).
    round: u32,
    /// Previews started since start-up: a preview's number, never reused, so a late event of
    /// an earlier session's preview cannot pass for the current one.
    previews: u32,
    sessions: u64,
    record: SessionRecord,
    last_input: Instant,
    /// The last final picture, shown on the attract screen.
    last_picture: Option<RgbImage>,
    /// The current session's report was sent.
    reported: bool,
    /// Why the last prompt was refused, shown until the next key.
    notice: Option<String>,
    /// Pooled text embeddings of the last two finished previews of this session (previous,
    /// last), for the predictor's prompt change.
    pooled: (Option<Vec<f32>>, Option<Vec<f32>>),
}

/// What a visitor sees when a preview's latent holds NaN or infinite values (a broken model or
/// an overflow): the session ends as failed, nothing is sent to the cloud or refined locally.
pub const NON_FINITE_PREVIEW: &str = "The model produced an invalid picture (not a number).";

/// What a visitor sees when the prompt is longer than the model reads (over 77 CLIP tokens):
/// the preview would silently drop the end and the cloud would refuse it.
pub const LONG_NOTICE: &str = "Please use fewer words";

/// What a visitor sees when the blocklist refuses their prompt: no word is repeated back.
pub const BLOCKED_NOTICE: &str = "Please try other words";

/// What a visitor sees when they press Preview before typing anything.
pub const EMPTY_NOTICE: &str = "Type a few words first";

impl Session {
    /// A kiosk showing the attract screen at `now`.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        Self {
            seed: config.base_seed,
            config,
            state: State::Attract,
            prompt: String::new(),
            round: 0,
            previews: 0,
            sessions: 0,
            record: new_record(0),
            last_input: now,
            last_picture: None,
            reported: false,
            notice: None,
            pooled: (None, None),
        }
    }

    /// The current prompt text.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// The session's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The settings in force, for changes between sessions and rounds (operators' settings
    /// over MQTT): preview steps, noise level, idle timeout and blocklist take effect at the
    /// next round or finalize.
    pub fn config_mut(&mut self) -> &mut SessionConfig {
        &mut self.config
    }

    /// The record so far.
    pub fn record(&self) -> &SessionRecord {
        &self.record
    }

    /// When to send the next [`Event::Tick`]: the idle timeout, except while the kiosk works.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Attract | State::Generating { .. } | State::Refining { .. } => None,
            _ => Some(self.last_input + self.config.idle_timeout),
        }
    }

    /// Whether the kiosk is working for the visitor (a preview or a refinement is running).
    pub fn busy(&self) -> bool {
        matches!(
            self.state,
            State::Generating { .. } | State::Refining { .. }
        )
    }

    /// What the display shows now.
    pub fn screen(&self) -> Screen {
        match &self.state {
            State::Attract => Screen::Attract {
                hint: self.config.hint.clone(),
                last: self.last_picture.clone(),
            },
            State::Editing { shift, pressed } => Screen::PromptEntry {
                text: self.prompt.clone(),
                cursor_visible: true,
                shift: *shift,
                pressed: *pressed,
                notice: self.notice.clone(),
            },
            State::Generating {
                step, total, image, ..
            } => Screen::Generating {
                prompt: self.prompt.clone(),
                step: *step,
                total: *total,
                preview: image.clone(),
                round: self.round,
            },
            State::Previewing { image, .. } => Screen::Preview {
                prompt: self.prompt.clone(),
                image: image.clone(),
                round: self.round,
                seed: self.seed,
            },
            State::Refining { status, image, .. } => Screen::Refining {
                image: Some(image.clone()),
                status: *status,
            },
            State::Final { image, path } => Screen::Final {
                image: image.clone(),
                path: *path,
            },
            State::Failed { title, message } => Screen::Error {
                title: title.clone(),
                message: message.clone(),
            },
        }
    }

    /// Feeds one event at `now`; returns the commands to execute, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Action(action) => {
                self.last_input = now;
                self.action(action, now, &mut out);
            }
            Event::Tick => {
                if self.next_deadline().is_some_and(|d| now >= d) {
                    self.end(Ending::Abandoned, &mut out);
                }
            }
            other => self.progress(other, now, &mut out),
        }
        out
    }

    /// The kiosk is stopping (SIGTERM, an operator's restart): ends the session in progress,
    /// reported as abandoned (or finished, if its picture was shown), and shows the attract
    /// screen. Nothing when no session is open.
    pub fn interrupt(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        self.end(Ending::Abandoned, &mut out);
        out
    }

    /// A space typed in the prompt. The prompt box wraps words and draws a run of spaces as
    /// one, with none at the start, so a leading or second consecutive space is ignored: the
    /// text being edited is always what the visitor sees, and Backspace always visibly
    /// removes something (CLIP's tokenizer collapses whitespace anyway).
    fn type_space(&mut self) {
        let after_word = self
            .prompt
            .chars()
            .next_back()
            .is_some_and(|c| !c.is_whitespace());
        if after_word && self.prompt.len() < self.config.max_prompt_bytes {
            self.prompt.push(' ');
        }
    }

    fn action(&mut self, action: Action, now: Instant, out: &mut Vec<Command>) {
        match (&mut self.state, action) {
            (State::Attract, _) => {
                self.sessions += 1;
                self.record = new_record(self.sessions);
                self.reported = false;
                self.seed = session_seed(self.config.base_seed, self.sessions);
                self.round = 0;
                self.pooled = (None, None);
                self.prompt.clear();
                self.state = State::Editing {
                    shift: false,
                    pressed: None,
                };
            }
            (State::Editing { shift, pressed }, Action::Key(key)) => {
                *pressed = Some(key);
                self.notice = None;
                match key {
                    Key::Char(c) if c.is_whitespace() => self.type_space(),
                    Key::Char(c) => {
                        let c = if *shift { upper(c) } else { c };
                        *shift = false;
                        if self.prompt.len() + c.len_utf8() <= self.config.max_prompt_bytes {
                            self.prompt.push(c);
                        }
                    }
                    Key::Space => self.type_space(),
                    Key::Backspace => {
                        self.prompt.pop();
                    }
                    Key::Shift => *shift = !*shift,
                    Key::Clear => self.prompt.clear(),
                    Key::Done => {
                        if let Some(word) = diffusionx_fleet::settings::blocked_word(
                            &self.config.blocklist,
                            &self.prompt,
                        ) {
                            tracing::info!(word, "prompt refused by the blocklist");
                            self.record.blocked_prompts += 1;
                            self.notice = Some(BLOCKED_NOTICE.into());
                        } else if self.prompt.trim().is_empty() {
                            self.notice = Some(EMPTY_NOTICE.into());
                        } else if let Some(tokens) = self.too_many_tokens() {
                            tracing::info!(tokens, "prompt refused: too long for CLIP");
                            self.notice = Some(LONG_NOTICE.into());
                        } else {
                            self.start_round(now, out);
                        }
                    }
                }
            }
            // Typing while a preview runs: the visitor is changing the prompt, so the running
            // preview is stale. Cancel it and edit.
            (State::Generating { preview, .. }, Action::Key(key)) => {
                let preview = *preview;
                self.cancel_round(preview, out);
                self.state = State::Editing {
                    shift: false,
                    pressed: None,
                };
                if key != Key::Done {
                    self.action(Action::Key(key), now, out);
                }
            }
            (State::Generating { preview, .. }, Action::EditPrompt) => {
                let preview = *preview;
                self.cancel_round(preview, out);
                self.state = State::Editing {
                    shift: false,
                    pressed: None,
                };
            }
            (State::Previewing { .. }, Action::EditPrompt) => {
                self.state = State::Editing {
                    shift: false,
                    pressed: None,
                };
            }
            (State::Previewing { .. }, Action::NewSeed) => {
                self.seed = next_seed(self.seed);
                self.start_round(now, out);
            }
            (
                State::Previewing {
                    latent,
                    image,
                    facts,
                },
                Action::Finalize,
            ) => {
                let observation = facts
                    .take()
                    .and_then(|facts| observe(facts, self.pooled.0.clone(), self.round, latent));
                let handover = Handover {
                    prompt: self.prompt.clone(),
                    seed: self.seed,
                    noise_level: self.config.noise_level,
                    latent: std::mem::take(latent),
                    observation,
                };
                let image = image.clone();
                self.record.noise_level = Some(self.config.noise_level);
                if !self.config.gateway {
                    self.record.fallback_reason = Some(LOCAL_ONLY.into());
                    out.push(Command::SaveRecord(self.record.clone()));
                    out.push(Command::RefineLocally(handover.clone()));
                    self.state = State::Refining {
                        status: RefineStatus::Local { step: 0, total: 0 },
                        image,
                        handover,
                        started: now,
                    };
                    return;
                }
                // The record is durable before the network is touched.
                out.push(Command::SaveRecord(self.record.clone()));
                out.push(Command::RefineInCloud(handover.clone()));
                self.state = State::Refining {
                    status: RefineStatus::Connecting,
                    image,
                    handover,
                    started: now,
                };
            }
            (State::Final { .. }, Action::ThumbsUp) => self.record.thumbs_up = Some(true),
            (State::Final { .. }, Action::ThumbsDown) => self.record.thumbs_up = Some(false),
            (State::Final { .. }, Action::NewPicture)
            | (State::Failed { .. }, Action::StartOver) => {
                self.end(Ending::Finished, out);
                // Straight into a new session's prompt entry.
                self.action(Action::StartSession, now, out);
            }
            _ => {}
        }
    }

    fn progress(&mut self, event: Event, now: Instant, out: &mut Vec<Command>) {
        match (&mut self.state, event) {
            (
                State::Generating {
                    preview,
                    step,
                    total,
                    image: shown,
                    ..
                },
                Event::PreviewStep {
                    round: r,
                    step: s,
                    total: t,
                    image,
                },
            ) if *preview == r => {
                (*step, *total, *shown) = (s, t, Some(image));
            }
            (
                State::Generating { preview: round, .. },
                Event::PreviewDone {
                    round: r, latent, ..
                },
            ) if *round == r && !latent.iter().all(|v| v.is_finite()) => {
                // A broken model or an overflow: the picture is black and the latent is
                // useless to the cloud and to a local refinement alike. Nothing to finalize.
                tracing::error!(round = r, "the preview's latent is not finite");
                self.fail_preview(NON_FINITE_PREVIEW.into(), now);
            }
            (
                State::Generating {
                    preview: round,
                    started,
                    ..
                },
                Event::PreviewDone {
                    round: r,
                    image,
                    latent,
                    facts,
                },
            ) if *round == r => {
                if let Some(f) = &facts {
                    self.pooled = (self.pooled.1.take(), Some(f.pooled.clone()));
                }
                let ms = now.saturating_duration_since(*started).as_millis() as u64;
                if let Some(last) = self.record.rounds.last_mut() {
                    last.preview_ms = Some(ms);
                }
                self.state = State::Previewing {
                    image,
                    latent,
                    facts,
                };
                // The idle timer restarts when the result appears.
                self.last_input = now;
            }
            (State::Generating { preview, .. }, Event::PreviewFailed { round: r, message })
                if *preview == r =>
            {
                self.fail_preview(message, now);
            }
            (
                State::Refining { .. },
                Event::CloudLoad {
                    queue_depth,
                    expected_wait_ms,
                },
            ) => self.record.cloud_load = Some((queue_depth, expected_wait_ms)),
            (
                State::Refining { .. },
                Event::CloudDecided {
                    noise_level,
                    predictor,
                    predictor_error,
                },
            ) => {
                self.record.noise_level = Some(noise_level);
                self.record.predictor = predictor;
                self.record.predictor_error = predictor_error;
                // The decision is part of the durable record before the latent goes out.
                out.push(Command::SaveRecord(self.record.clone()));
            }
            (State::Refining { status, .. }, Event::CloudQueued { position, wait_ms }) => {
                *status = RefineStatus::Queued { position, wait_ms };
            }
            (State::Refining { status, .. }, Event::CloudStep { step, total }) => {
                self.record.cloud_steps = Some(total);
                *status = RefineStatus::Cloud { step, total };
            }
            (State::Refining { started, .. }, Event::CloudDone { image }) => {
                let ms = now.saturating_duration_since(*started).as_millis() as u64;
                self.finish(image, FinalPath::Cloud, ms, now);
            }
            (
                State::Refining {
                    status, handover, ..
                },
                Event::CloudFailed(why),
            ) if !matches!(status, RefineStatus::Local { .. }) => {
                // Only the first failure counts: a deadline after a drop starts nothing new.
                self.record.fallback_reason = Some(why.reason());
                // The kiosk redoes its own configured share, whatever the cloud was asked.
                self.record.noise_level = Some(handover.noise_level);
                self.record.cloud_steps = None;
                *status = RefineStatus::Local { step: 0, total: 0 };
                out.push(Command::RefineLocally(handover.clone()));
            }
            (State::Refining { status, .. }, Event::LocalStep { step, total }) => {
                *status = RefineStatus::Local { step, total };
            }
            (State::Refining { started, .. }, Event::LocalDone { image }) => {
                let ms = now.saturating_duration_since(*started).as_millis() as u64;
                self.finish(image, FinalPath::Local, ms, now);
            }
            (State::Refining { .. }, Event::LocalFailed { message }) => {
                self.state = State::Failed {
                    title: "The picture could not be finished".into(),
                    message,
                };
                self.record.ending = Ending::Failed;
                self.last_input = now;
            }
            // Late events of a cancelled round or an abandoned refinement: nothing to do.
            _ => {}
        }
    }

    /// The round's preview failed: the session ends as failed, showing `message`.
    fn fail_preview(&mut self, message: String, now: Instant) {
        self.state = State::Failed {
            title: "The preview did not work".into(),
            message,
        };
        self.record.ending = Ending::Failed;
        self.last_input = now;
    }

    /// The prompt's token count when it is over [`MAX_PROMPT_TOKENS`].
    fn too_many_tokens(&self) -> Option<usize> {
        let counter = self.config.prompt_tokens.as_ref()?;
        (counter.0)(&self.prompt).filter(|&n| n > MAX_PROMPT_TOKENS)
    }

    fn start_round(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.round += 1;
        self.previews += 1;
        self.record.rounds.push(RoundRecord {
            prompt: self.prompt.clone(),
            seed: self.seed,
            steps: self.config.preview_steps,
            preview_ms: None,
        });
        out.push(Command::StartPreview {
            round: self.previews,
            prompt: self.prompt.clone(),
            seed: self.seed,
            steps: self.config.preview_steps,
        });
        self.state = State::Generating {
            preview: self.previews,
            started: now,
            step: 0,
            total: self.config.preview_steps,
            image: None,
        };
    }

    fn cancel_round(&mut self, round: u32, out: &mut Vec<Command>) {
        out.push(Command::CancelPreview { round });
    }

    fn finish(&mut self, image: RgbImage, path: FinalPath, ms: u64, now: Instant) {
        self.record.path = Some(path);
        self.record.refine_ms = Some(ms);
        self.last_picture = Some(image.clone());
        self.state = State::Final { image, path };
        self.last_input = now;
    }

    fn end(&mut self, ending: Ending, out: &mut Vec<Command>) {
        if let State::Generating { preview, .. } = self.state {
            out.push(Command::CancelPreview { round: preview });
        }
        if self.sessions > 0 && !self.reported {
            if self.record.ending == Ending::Open {
                self.record.ending = if self.record.path.is_some() {
                    Ending::Finished
                } else {
                    ending
                };
            }
            self.reported = true;
            out.push(Command::Report(self.record.clone()));
        }
        // The next visitor must not see this one's prompt.
        self.prompt.clear();
        self.state = State::Attract;
    }
}

/// An open session's empty record.
pub(crate) fn new_record(number: u64) -> SessionRecord {
    SessionRecord {
        number,
        rounds: Vec::new(),
        noise_level: None,
        predictor: None,
        predictor_error: None,
        cloud_steps: None,
        path: None,
        cloud_load: None,
        fallback_reason: None,
        refine_ms: None,
        thumbs_up: None,
        blocked_prompts: 0,
        ending: Ending::Open,
    }
}

/// The predictor's view of the final preview; `None` (the fixed level is used) if the
/// latent cannot be summarized (NaN from a broken model: the gateway refuses it anyway).
fn observe(
    facts: PreviewFacts,
    previous_pooled: Option<Vec<f32>>,
    rounds: u32,
    latent: &[f32],
) -> Option<Observation> {
    let stats = match latent_stats(latent) {
        Ok(stats) => stats,
        Err(why) => {
            tracing::warn!(%why, "the preview latent cannot be summarized for the predictor");
            return None;
        }
    };
    // The previous round's embedding is only comparable when the encoder is the same.
    let previous_pooled = previous_pooled.filter(|p| p.len() == facts.pooled.len());
    Some(Observation {
        pooled: facts.pooled,
        previous_pooled,
        prompt_tokens: facts.prompt_tokens,
        rounds: rounds.max(1),
        latent: stats,
        x0_change: facts.x0_change,
        width: facts.width,
        height: facts.height,
        edge_steps: facts.edge_steps,
    })
}

fn upper(c: char) -> char {
    let mut up = c.to_uppercase();
    match (up.next(), up.next()) {
        (Some(u), None) => u,
        _ => c,
    }
}

/// SplitMix64 of the base seed and the session number: distinct sessions, reproducible runs.
fn session_seed(base: u64, session: u64) -> u64 {
    next_seed(base ^ session.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn next_seed(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & ((1 << 53) - 1)
}
