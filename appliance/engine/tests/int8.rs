//! The int8 pipeline: tract's integer kernels against onnxruntime on the same int8 graph, and the
//! int8 pipeline's pictures against the f32 pipeline's (the numbers are in docs/benchmarks.md).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{
    Decode, EngineConfig, Generation, Outcome, Pipeline, Precision, Request, Start, npy,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn load(folder: &str) -> Pipeline {
    Pipeline::load(
        &fixtures().join(folder),
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn f32s(file: &str) -> Vec<f32> {
    npy::read::<f32>(&fixtures().join("tiny-sd-int8-reference").join(file))
        .unwrap()
        .data
}

/// (max, mean) absolute difference.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let abs = a.iter().zip(b).map(|(x, y)| (x - y).abs());
    (
        abs.clone().fold(0.0, f32::max),
        abs.sum::<f32>() / a.len() as f32,
    )
}

#[test]
fn tract_int8_unet_is_as_close_to_f32_as_onnxruntime_int8() {
    let (f32_pipeline, int8) = (load("tiny-sd"), load("tiny-sd-int8"));
    assert_eq!(int8.folder().manifest().precision, Precision::Int8);
    let (sample, embeddings) = (
        f32s("unet_sample.npy"),
        f32s("unet_encoder_hidden_states.npy"),
    );
    let timestep = f32s("unet_timestep.npy")[0];
    let tract_int8 = int8
        .predict_noise(&sample, 2, (32, 32), timestep, &embeddings)
        .unwrap();
    let tract_f32 = f32_pipeline
        .predict_noise(&sample, 2, (32, 32), timestep, &embeddings)
        .unwrap();
    let ort_int8 = f32s("unet_out_sample.npy");
    let (ours, theirs) = (diff(&tract_int8, &tract_f32), diff(&ort_int8, &tract_f32));
    println!("vs f32, (max, mean) abs diff: tract int8 {ours:?}, onnxruntime int8 {theirs:?}");
    // Dynamic quantization rounds every activation to 8 bits per call, and the two runtimes
    // round some values to different neighbours (seen: tract vs onnxruntime int8 differ by a
    // mean 0.029 on outputs of std 1). What must hold is that tract's int8 is as faithful to
    // f32 as onnxruntime's: a broken zero point or scale would be orders of magnitude off.
    assert!(
        ours.1 <= 1.25 * theirs.1,
        "mean error: tract {} vs onnxruntime {}",
        ours.1,
        theirs.1
    );
    assert!(
        ours.0 <= 2.0 * theirs.0,
        "max error: tract {} vs onnxruntime {}",
        ours.0,
        theirs.0
    );
    assert!(ours.1 < 0.05, "mean error {} on outputs of std 1", ours.1);
}

fn generate(pipeline: &Pipeline, scheduler: SchedulerKind) -> Generation {
    let request = Request {
        prompt: "a red fox in the snow, watercolor".into(),
        negative_prompt: "blurry".into(),
        seed: 42,
        width: 256,
        height: 256,
        steps: 4,
        guidance_scale: 7.5,
        scheduler,
        start: Start::Noise(None),
        step_noise: None,
        decode: Decode::Vae,
    };
    match pipeline
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .unwrap()
    {
        Outcome::Finished(generation) => generation,
        Outcome::Cancelled { .. } => panic!("not cancelled"),
    }
}

/// PSNR in dB of two images in [0, 1].
fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse).log10()
}

#[test]
fn the_int8_pipeline_stays_close_to_f32() {
    let (f32_pipeline, int8_pipeline) = (load("tiny-sd"), load("tiny-sd-int8"));
    for scheduler in [SchedulerKind::Ddim, SchedulerKind::DpmSolverPp2m] {
        let (a, b) = (
            generate(&f32_pipeline, scheduler),
            generate(&int8_pipeline, scheduler),
        );
        let latent_diff = a
            .latent
            .iter()
            .zip(&b.latent)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let latent_scale = a.latent.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        let db = psnr(&a.image_f32.unwrap(), &b.image_f32.unwrap());
        println!(
            "{scheduler:?}: int8 vs f32 latent max abs diff {latent_diff} (max |latent| {latent_scale}), image PSNR {db:.1} dB"
        );
        assert!(db > 28.0, "{scheduler:?}: PSNR {db:.1} dB");
        assert!(
            latent_diff < 0.2 * latent_scale,
            "{scheduler:?}: latent diff {latent_diff}"
        );
    }
}
