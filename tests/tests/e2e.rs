//! The whole system end to end: a scripted visitor on a headless kiosk, previews on the edge
//! engine (tract, tiny Tiny-SD), the handover over real QUIC with mTLS to a real gateway (candle,
//! tiny SD v1.5), the final image on the display; and the same with the gateway killed mid-job,
//! where the kiosk falls back to refining locally and says so.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::time::Duration;

use std::ops::ControlFlow;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_e2e::{KioskOptions, kiosk, repo, start_gateway, tiny_sd, tiny_sd15};
use diffusionx_engine::{Decode, Outcome as Run, Pipeline, Request, Start};
use diffusionx_fleet::{NoiseLevelMode, NoisePolicy};
use diffusionx_gateway::metrics::Outcome;
use diffusionx_kiosk::script::{self, ScreenKind, Step};
use diffusionx_kiosk::session::RoundRecord;
use diffusionx_predictor::{Projection, Source};
use diffusionx_ui::{FinalPath, RefineStatus, Screen};

fn visitor() -> Vec<Step> {
    script::parse(&std::fs::read_to_string(repo().join("tests/visitor.txt")).unwrap()).unwrap()
}

/// The predictor chooses the level (rule-based default, the default policy).
fn options(dir: &std::path::Path, cloud_steps: u16) -> KioskOptions {
    KioskOptions {
        dir: dir.to_path_buf(),
        model: tiny_sd(),
        panel: (800, 480),
        cloud_steps,
        noise_level: NoiseLevel::from_bp(5000).unwrap(),
        noise_policy: NoisePolicy::default(),
        predictor: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_gets_a_cloud_refined_picture() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(dir.path(), &tiny_sd15()).await.unwrap();
    // The fixed level lies outside the predictor's bounds, so it cannot pass for a decision.
    let mut options = options(dir.path(), 20);
    options.noise_level = NoiseLevel::from_bp(9000).unwrap();
    let mut kiosk = kiosk(&gateway, &options).unwrap();
    kiosk
        .play(&visitor(), Duration::from_secs(120))
        .await
        .unwrap();

    // The final picture is the gateway's.
    let Screen::Final { image, path } = kiosk.session().screen() else {
        panic!("not on the final screen");
    };
    assert_eq!(path, FinalPath::Cloud);
    assert_eq!((image.width(), image.height()), (256, 256));
    let distinct: std::collections::HashSet<&[u8]> = image.pixels().chunks(3).collect();
    assert!(distinct.len() > 100, "a picture, not a flat fill");

    let record = kiosk.session().record();
    // It is the refinement of the last preview at the level and steps the kiosk recorded,
    // computed here without the kiosk, QUIC or the gateway's scheduler (within the rounding of
    // two runs of the same CPU code), and far from that preview unrefined.
    let (expected, unrefined) = cloud_refinement(
        record.rounds.last().unwrap(),
        record.noise_level.unwrap(),
        options.cloud_steps,
    );
    let off = max_abs_diff(image.pixels(), &expected);
    assert!(
        off <= 2,
        "the final picture is {off}/255 off the gateway's refinement"
    );
    let apart = mean_abs_diff(image.pixels(), &unrefined);
    assert!(
        apart > 4.0,
        "the final picture is {apart}/255 on average from the unrefined preview"
    );

    let prompts: Vec<&str> = record.rounds.iter().map(|r| r.prompt.as_str()).collect();
    assert_eq!(
        prompts,
        vec![
            "a lighthouse on a cliff at dusk",
            "a lighthouse on a cliff at night",
            "a lighthouse on a cliff at night"
        ]
    );
    assert_eq!(
        record.rounds[0].seed, record.rounds[1].seed,
        "same seed on edit"
    );
    assert_ne!(
        record.rounds[1].seed, record.rounds[2].seed,
        "new seed asked for"
    );
    assert!(record.rounds.iter().all(|r| r.preview_ms.is_some()));
    assert_eq!(record.thumbs_up, Some(true));
    assert_eq!(record.fallback_reason, None);
    assert_eq!(
        record.cloud_load,
        Some((0, 0)),
        "probed an idle gateway before sending"
    );
    assert_eq!(gateway.gateway.metrics().jobs(Outcome::Done), 1);

    // The noise level predictor chose the level from what this kiosk measured, and the
    // gateway ran exactly the steps it decided.
    let report = record.predictor.as_deref().expect("the predictor decided");
    let d = &report.decision;
    assert_eq!(d.source, Source::RuleBased);
    assert!((0.2..=0.8).contains(&d.level), "{d:?}");
    assert_eq!(record.noise_level.unwrap().bp(), d.level_bp);
    assert_eq!(record.cloud_steps, Some(d.cloud_steps as u16));
    assert_eq!(d.cloud_steps, 20 * u32::from(d.level_bp) / 10_000);
    let c = &report.context;
    assert_eq!((c.queue_depth, c.steps_total), (0, 20));
    assert!(
        c.rtt_ms > 0.0 && c.rtt_ms < 1000.0,
        "loopback RTT {}",
        c.rtt_ms
    );
    assert!(c.uplink_bytes_per_s > 0.0);
    // The request: a 4x32x32 f16 latent plus the prompt and the header.
    assert!((8192..9000).contains(&c.latent_bytes), "{}", c.latent_bytes);
    // Its features are the final preview's, computed as the label tool computes them.
    let f = &report.features;
    let pipeline = diffusionx_engine::Pipeline::load(&tiny_sd(), &Default::default()).unwrap();
    let facts = pipeline
        .prompt_facts("a lighthouse on a cliff at night")
        .unwrap();
    assert_eq!(facts.pooled.len(), diffusionx_e2e::TINY_TEXT_WIDTH);
    let projection = Projection::standard(facts.pooled.len()).unwrap();
    assert_eq!(report.projection, projection.fingerprint());
    assert_eq!(f.text, projection.project(&facts.pooled).unwrap());
    assert_eq!((f.prompt_tokens, f.rounds), (facts.tokens, 3));
    assert!(f.prompt_cosine > 0.9999, "round 3 kept round 2's prompt");
    assert_eq!((f.width, f.height, f.edge_steps), (256, 256, 4));
    assert!(f.x0_change > 0.0 && f.latent_std > 0.0);

    // The record was on disk before the network was touched, with the three rounds.
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("records/current.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["rounds"].as_array().unwrap().len(), 3);
    assert_eq!(saved["noise_level"], serde_json::json!(d.level));
    assert_eq!(saved["predictor"]["decision"]["level_bp"], d.level_bp);

    // One snapshot per screen the visitor saw, in order.
    let kinds: Vec<String> = kiosk
        .snapshots()
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            name.split_once('-').unwrap().1.to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "attract",
            "prompt",
            "generating",
            "preview",
            "prompt",
            "generating",
            "preview",
            "generating",
            "preview",
            "refining",
            "final"
        ]
    );
    gateway.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_job_falls_back_to_local_refinement() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(dir.path(), &tiny_sd15()).await.unwrap();
    // A long cloud job (200 schedule steps at a fixed 0.5: 100 steps) so the kill lands
    // mid-job.
    let mut options = options(dir.path(), 200);
    options.noise_policy.noise_level_mode = NoiseLevelMode::Fixed;
    let mut kiosk = kiosk(&gateway, &options).unwrap();
    let steps = visitor();
    let finalize = steps
        .iter()
        .position(|s| *s == Step::Press(diffusionx_ui::Action::Finalize))
        .unwrap();
    kiosk
        .play(&steps[..=finalize], Duration::from_secs(120))
        .await
        .unwrap();
    kiosk
        .wait_until(Duration::from_secs(60), |screen| {
            matches!(
                screen,
                Screen::Refining {
                    status: RefineStatus::Cloud { step: 1.., .. },
                    ..
                }
            )
        })
        .await
        .unwrap();
    gateway.gateway.kill();

    // While it refines locally the screen says so.
    kiosk
        .wait_until(Duration::from_secs(60), |screen| {
            matches!(
                screen,
                Screen::Refining {
                    status: RefineStatus::Local { .. },
                    ..
                }
            )
        })
        .await
        .unwrap();
    kiosk
        .play(&[Step::Wait(ScreenKind::Final)], Duration::from_secs(120))
        .await
        .unwrap();
    let Screen::Final { path, image } = kiosk.session().screen() else {
        panic!("not on the final screen");
    };
    assert_eq!(path, FinalPath::Local);
    assert_eq!((image.width(), image.height()), (256, 256));
    let reason = kiosk.session().record().fallback_reason.clone().unwrap();
    assert!(reason.starts_with("unreachable"), "{reason}");
    let record = kiosk.session().record();
    assert_eq!(record.path, Some(FinalPath::Local));
    // The picture is the edge engine's img2img of the last preview (the kiosk's refinement
    // settings: 10 steps, guidance 7.5, DDIM, at the fixed level), not the preview itself.
    let pipeline = Pipeline::load(&tiny_sd(), &Default::default()).unwrap();
    let last = record.rounds.last().unwrap();
    let latent = preview_latent(&pipeline, last);
    let local = generate(
        &pipeline,
        Request {
            steps: 10,
            guidance_scale: 7.5,
            start: Start::Latent {
                latent,
                noise_level: record.noise_level.unwrap(),
                noise: None,
            },
            decode: Decode::Vae,
            ..preview_request(last)
        },
    );
    let expected = local.image.unwrap().pixels;
    let off = max_abs_diff(image.pixels(), &expected);
    assert!(
        off <= 2,
        "the final picture is {off}/255 off the local refinement"
    );
}

/// The edge engine's request for `round`'s preview, as the kiosk makes it (256 px, no
/// guidance, DDIM), keeping the latent only.
fn preview_request(round: &RoundRecord) -> Request {
    Request {
        prompt: round.prompt.clone(),
        negative_prompt: String::new(),
        seed: round.seed,
        width: 256,
        height: 256,
        steps: round.steps,
        guidance_scale: 1.0,
        scheduler: SchedulerKind::Ddim,
        start: Start::Noise(None),
        step_noise: None,
        decode: Decode::Skip,
    }
}

fn generate(pipeline: &Pipeline, request: Request) -> diffusionx_engine::Generation {
    match pipeline
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .unwrap()
    {
        Run::Finished(generation) => generation,
        Run::Cancelled { .. } => unreachable!("never asked to stop"),
    }
}

/// `round`'s preview latent, `[4, 32, 32]`.
fn preview_latent(pipeline: &Pipeline, round: &RoundRecord) -> Vec<f32> {
    generate(pipeline, preview_request(round)).latent
}

/// The gateway's picture for `round`'s preview refined at `level` on a `steps`-step schedule
/// (the kiosk's request: no negative prompt, guidance 7.5, DDIM, the latent sent as f16), and
/// the same preview decoded unrefined by the gateway's VAE; both as the gateway encodes them
/// (RGB bytes, `round(255 x)`).
fn cloud_refinement(round: &RoundRecord, level: NoiseLevel, steps: u16) -> (Vec<u8>, Vec<u8>) {
    let pipeline = Pipeline::load(&tiny_sd(), &Default::default()).unwrap();
    let latent: Vec<f32> = preview_latent(&pipeline, round)
        .into_iter()
        .map(through_f16)
        .collect();
    let refiner = diffusionx_refine::Refiner::load(&tiny_sd15()).unwrap();
    let job = diffusionx_refine::RefineJob {
        prompt: round.prompt.clone(),
        negative_prompt: String::new(),
        seed: round.seed,
        latent_height: 32,
        latent_width: 32,
        steps,
        noise_level: level,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::Ddim,
        latent: latent.clone(),
        decode: true,
    };
    let refined = refiner
        .refine(&job, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .unwrap();
    let unrefined = refiner.decode(&latent, 32, 32).unwrap();
    (rgb_bytes(&refined.image.unwrap()), rgb_bytes(&unrefined))
}

/// `[3, H, W]` in [0, 1] to interleaved RGB bytes, as the gateway encodes its PNG.
fn rgb_bytes(chw: &[f32]) -> Vec<u8> {
    let plane = chw.len() / 3;
    (0..plane)
        .flat_map(|i| {
            (0..3).map(move |c| (chw[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8)
        })
        .collect()
}

/// `v` rounded to the nearest f16 (ties to even), as the kiosk sends its latent; latents lie far
/// inside f16's range, so only f16's subnormals need their own case.
fn through_f16(v: f32) -> f32 {
    const MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
    if v.abs() < MIN_NORMAL {
        let quantum = 2f32.powi(-24);
        return (v / quantum).round_ties_even() * quantum;
    }
    let bits = v.to_bits();
    f32::from_bits((bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff)
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.len() as f64
}
