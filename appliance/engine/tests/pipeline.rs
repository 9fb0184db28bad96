//! Pipeline behaviour beyond conformance: cancellation between steps, the text embedding cache,
//! live previews, seeds, and requests it must refuse.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::OnceLock;

use diffusionx_diffusion::{NoiseLevel, Scheduler, SchedulerKind};
use diffusionx_engine::{
    Decode, EngineConfig, EngineError, Outcome, Pipeline, Request, Start, latent_to_rgb,
};

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd");
        Pipeline::load(
            &root,
            &EngineConfig {
                threads: 1,
                ..EngineConfig::default()
            },
        )
        .unwrap()
    })
}

fn request(seed: u64) -> Request {
    Request {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        seed,
        width: 256,
        height: 256,
        steps: 4,
        guidance_scale: 1.0,
        scheduler: SchedulerKind::Euler,
        start: Start::Noise(None),
        step_noise: None,
        decode: Decode::Skip,
    }
}

fn finish(request: &Request) -> diffusionx_engine::Generation {
    match pipeline()
        .generate(request, &mut |_| ControlFlow::Continue(()))
        .unwrap()
    {
        Outcome::Finished(generation) => generation,
        Outcome::Cancelled { .. } => panic!("not cancelled"),
    }
}

#[test]
fn a_run_stops_between_steps_when_the_callback_asks() {
    let mut seen = Vec::new();
    let outcome = pipeline()
        .generate(&request(1), &mut |p| {
            seen.push((p.step, p.total));
            if p.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(outcome, Outcome::Cancelled { after_step: 2 });
    assert_eq!(seen, [(1, 4), (2, 4)]);
}

#[test]
fn every_step_reports_a_preview_of_the_predicted_clean_latent() {
    let mut previews = Vec::new();
    pipeline()
        .generate(&request(2), &mut |p| {
            let preview = p.preview();
            assert_eq!(preview, latent_to_rgb(p.denoised, 32, 32));
            previews.push((preview.width, preview.height, preview.pixels.len()));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(previews, vec![(32, 32, 32 * 32 * 3); 4]);
}

#[test]
fn the_same_seed_gives_the_same_latent_and_another_seed_does_not() {
    let a = finish(&request(7)).latent;
    let b = finish(&request(7)).latent;
    let c = finish(&request(8)).latent;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn prompt_embeddings_are_cached_until_cleared() {
    let pipeline = pipeline();
    let first = pipeline.encode_text("a cached prompt").unwrap();
    let again = pipeline.encode_text("a cached prompt").unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "the second call is served from the cache"
    );
    pipeline.clear_text_cache();
    let fresh = pipeline.encode_text("a cached prompt").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &fresh));
    assert_eq!(*first, *fresh, "the same prompt encodes to the same values");
}

fn rmse(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let sum: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    (sum / a.len() as f32).sqrt()
}

#[test]
fn img2img_at_full_level_runs_every_step_and_a_small_level_few() {
    let latent = finish(&request(3)).latent;
    let mut img2img = request(3);
    img2img.start = Start::Latent {
        latent: latent.clone(),
        noise_level: NoiseLevel::from_bp(2500).unwrap(),
        noise: None,
    };
    let small = finish(&img2img);
    assert_eq!(small.steps_run, 1);
    // The one step redoes a little of the given latent: the result stays near it, much nearer
    // than to another seed's picture (a run that ignored the latent would be as far from both).
    let unrelated = finish(&request(31)).latent;
    let (near, far) = (
        rmse(&small.latent, &latent),
        rmse(&small.latent, &unrelated),
    );
    assert!(near < far / 4.0, "{near} vs {far}");
    img2img.steps = 8;
    assert_eq!(finish(&img2img).steps_run, 2);
    // The full level redoes every step of the schedule.
    img2img.steps = 4;
    img2img.start = Start::Latent {
        latent,
        noise_level: NoiseLevel::from_bp(NoiseLevel::MAX_BP).unwrap(),
        noise: None,
    };
    assert_eq!(finish(&img2img).steps_run, 4);
}

/// With zero re-noising noise the first UNet input is `sqrt(abar_t0) * latent` at the first
/// timestep img2img runs (DDIM scales nothing): the first step's predicted clean latent is what
/// DDIM makes of the UNet's prediction for exactly that input.
#[test]
fn img2img_starts_from_the_latent_re_noised_to_its_first_timestep() {
    let pipeline = pipeline();
    let latent = finish(&request(12)).latent;
    let level = NoiseLevel::from_bp(7500).unwrap();
    let mut img2img = request(12);
    img2img.scheduler = SchedulerKind::Ddim;
    img2img.start = Start::Latent {
        latent: latent.clone(),
        noise_level: level,
        noise: Some(vec![0.0; latent.len()]),
    };
    let mut first = None;
    let outcome = pipeline
        .generate(&img2img, &mut |p| {
            first.get_or_insert_with(|| p.denoised.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(matches!(outcome, Outcome::Finished(g) if g.steps_run == 3));
    let first = first.unwrap();

    // By hand: DDIM's 4-step leading schedule with steps_offset 1 is [751, 501, 251, 1]; 3 of
    // its 4 steps start at 501. abar from the fixture's scaled-linear betas.
    let scheduler =
        Scheduler::for_img2img(SchedulerKind::Ddim, pipeline.scheduler_config(), 4, level).unwrap();
    assert_eq!(scheduler.timesteps(), [501.0, 251.0, 1.0]);
    let abar = diffusionx_diffusion::NoiseSchedule::stable_diffusion().alphas_cumprod()[501];
    let input: Vec<f32> = latent.iter().map(|x| abar.sqrt() * x).collect();
    let embedding = pipeline.encode_text(&img2img.prompt).unwrap();
    let eps = pipeline
        .predict_noise(&input, 1, (32, 32), 501.0, &embedding)
        .unwrap();
    let x0: Vec<f32> = input
        .iter()
        .zip(&eps)
        .map(|(x, e)| (x - (1.0 - abar).sqrt() * e) / abar.sqrt())
        .collect();
    let worst = first
        .iter()
        .zip(&x0)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    // Not trivially close: the clean latent itself is far from that prediction.
    assert!(rmse(&x0, &latent) > 1e-2, "{}", rmse(&x0, &latent));
}

#[test]
fn decoding_gives_an_image_eight_times_the_latent() {
    let mut decoded = request(4);
    decoded.decode = Decode::Vae;
    decoded.width = 320;
    decoded.height = 256;
    let generation = finish(&decoded);
    let image = generation.image.unwrap();
    assert_eq!(
        (image.width, image.height, image.pixels.len()),
        (320, 256, 320 * 256 * 3)
    );
    assert_eq!(generation.latent_shape, [4, 32, 40]);
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let mut odd = request(5);
    odd.width = 300;
    let err = pipeline()
        .generate(&odd, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("300x256")),
        "{err}"
    );

    let mut short = request(5);
    short.start = Start::Noise(Some(vec![0.0; 10]));
    let err = pipeline()
        .generate(&short, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("noise has 10 values, the latent needs 4096"),
        "{err}"
    );
}

#[test]
fn non_finite_request_values_are_refused_with_their_field() {
    let refused = |request: &Request| match pipeline()
        .generate(request, &mut |_| ControlFlow::Continue(()))
    {
        Err(EngineError::InvalidRequest(message)) => message,
        other => panic!("{other:?}"),
    };
    // NaN would turn guidance off (and drop the negative prompt); inf makes every value NaN.
    for scale in [f32::NAN, f32::INFINITY] {
        let mut guided = request(5);
        guided.guidance_scale = scale;
        guided.negative_prompt = "blurry".into();
        assert_eq!(
            refused(&guided),
            format!("guidance_scale is {scale}, expected a finite number")
        );
    }
    let len = 4 * 32 * 32;
    let mut nan_latent = request(5);
    nan_latent.start = Start::Latent {
        latent: vec![f32::NAN; len],
        noise_level: NoiseLevel::from_bp(5000).unwrap(),
        noise: None,
    };
    assert_eq!(
        refused(&nan_latent),
        "start latent holds a non-finite value (NaN at index 0)"
    );
    let mut renoise = vec![0.0; len];
    renoise[7] = f32::NEG_INFINITY;
    nan_latent.start = Start::Latent {
        latent: vec![0.0; len],
        noise_level: NoiseLevel::from_bp(5000).unwrap(),
        noise: Some(renoise.clone()),
    };
    assert_eq!(
        refused(&nan_latent),
        "start noise holds a non-finite value (-inf at index 7)"
    );
    let mut noise = request(5);
    noise.start = Start::Noise(Some(renoise));
    assert_eq!(
        refused(&noise),
        "start noise holds a non-finite value (-inf at index 7)"
    );
    let mut lcm = request(5);
    lcm.scheduler = SchedulerKind::Lcm;
    let mut bad = vec![0.0; len];
    bad[len - 1] = f32::NAN;
    lcm.step_noise = Some(vec![vec![0.0; len], bad]);
    assert_eq!(
        refused(&lcm),
        format!(
            "step_noise[1] holds a non-finite value (NaN at index {})",
            len - 1
        )
    );
}

/// The kiosk's start-up refuses a size the export did not check (the fixture checked
/// `[256, 256]` and `[320, 192]`, `[height, width]`), and a guidance scale that is no number.
#[test]
fn prepare_refuses_a_resolution_the_manifest_does_not_list() {
    let folder = pipeline().folder();
    assert!(folder.checked(256, 256));
    assert!(!folder.checked(256, 320), "320 wide, 256 high");
    for (width, height) in [(512, 512), (320, 256)] {
        let err = pipeline().prepare(width, height, 7.5).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m == &format!(
                "{width}x{height} px is not among the model folder's checked resolutions \
                 ([256, 256], [320, 192]; [height, width] pairs in diffusionx.json)"
            )),
            "{err}"
        );
    }
    let err = pipeline().prepare(256, 256, f32::NAN).unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("guidance_scale is NaN")),
        "{err}"
    );
}

#[test]
fn prepared_plans_give_the_same_result_as_plans_built_on_first_use() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd");
    let prepared = Pipeline::load(
        &root,
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    prepared.prepare(256, 256, 7.5).unwrap();
    let mut guided = request(9);
    guided.guidance_scale = 7.5;
    guided.negative_prompt = "blurry".into();
    let run = |p: &Pipeline| match p
        .generate(&guided, &mut |_| ControlFlow::Continue(()))
        .unwrap()
    {
        Outcome::Finished(g) => g.latent,
        Outcome::Cancelled { .. } => panic!("not cancelled"),
    };
    assert_eq!(run(&prepared), run(pipeline()));
}

/// The pooled embedding is CLIP's `pooler_output`: the graph's own second output (what
/// transformers computes) for the same ids, whatever the prompt's length, truncation included.
#[test]
fn prompt_facts_give_the_text_encoders_pooler_output_and_the_token_count() {
    use tract_onnx::prelude::*;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd");
    let graph = tract_onnx::onnx()
        .model_for_path(root.join("text_encoder/model.onnx"))
        .unwrap()
        .with_input_fact(0, i64::fact([1, 77]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let long = "a very long prompt ".repeat(30);
    // A visitor may type the end token itself: CLIP pools at the first one.
    let eos = "a cat <|endoftext|> a dog";
    for (prompt, tokens) in [
        ("", 2),
        ("a lighthouse at dusk", 6),
        (long.as_str(), 77),
        (eos, 7),
    ] {
        let facts = pipeline().prompt_facts(prompt).unwrap();
        assert_eq!(facts.tokens, tokens, "{prompt:?}");
        let ids: Vec<i64> = pipeline()
            .tokenizer()
            .encode(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let ids = Tensor::from_shape(&[1, 77], &ids).unwrap();
        let outputs = graph.run(tvec![ids.into_tvalue()]).unwrap();
        let pooler = outputs[1].to_plain_array_view::<f32>().unwrap();
        let pooler: Vec<f32> = pooler.iter().copied().collect();
        assert_eq!(facts.pooled.len(), pooler.len());
        let diff = facts
            .pooled
            .iter()
            .zip(&pooler)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{prompt:?}: {diff}");
    }
}
