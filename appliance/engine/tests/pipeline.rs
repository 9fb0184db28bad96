//! Pipeline behaviour beyond conformance: cancellation between steps, the text embedding cache,
//! live previews, seeds, and requests it must refuse.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::OnceLock;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
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

#[test]
fn img2img_at_full_level_runs_every_step_and_a_small_level_few() {
    let latent = finish(&request(3)).latent;
    let mut img2img = request(3);
    img2img.start = Start::Latent {
        latent,
        noise_level: NoiseLevel::from_bp(2500).unwrap(),
        noise: None,
    };
    assert_eq!(finish(&img2img).steps_run, 1);
    img2img.steps = 8;
    assert_eq!(finish(&img2img).steps_run, 2);
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
    for (prompt, tokens) in [("", 2), ("a lighthouse at dusk", 6), (long.as_str(), 77)] {
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
