//! The tract pipeline against diffusers on the same tiny random-weight Tiny-SD graphs: token
//! ids, text embeddings, the latent after every step, the final latent and the decoded image,
//! for every scheduler, with and without guidance, text-to-image and img2img; and the optional
//! tiny VAE decoder against diffusers' `AutoencoderTiny`. The references were written by
//! `onnx/make_tiny.py` with diffusers on the PyTorch weights.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::npy;
use diffusionx_engine::{Decode, EngineConfig, Outcome, Pipeline, Products, Request, Start};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn f32s(dir: &Path, file: &str) -> Vec<f32> {
    npy::read::<f32>(&dir.join(file)).unwrap().data
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "same length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The committed tiny pipeline on one thread, its products on `products`' kernels.
fn tiny_pipeline(products: Products) -> Pipeline {
    Pipeline::load(
        &fixtures().join("tiny-sd"),
        &EngineConfig {
            threads: 1,
            products,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn kind(name: &str) -> SchedulerKind {
    SchedulerKind::from_diffusers_class(name).unwrap_or_else(|| panic!("unknown scheduler {name}"))
}

/// Tolerances, stated per quantity (f32 tract vs f32 PyTorch); what each case reaches is in
/// docs/kiosk.md, "The diffusion engine against diffusers".
const EMBEDDING_TOLERANCE: f32 = 1e-5;
const LATENT_TOLERANCE: f32 = 1e-4;
const IMAGE_TOLERANCE: f32 = 1e-4;
/// Text-to-image cases that amplify rounding: with classifier-free guidance the noise prediction
/// `uncond + 7.5 (cond - uncond)` scales the two UNet outputs' rounding differences by up to 14,
/// and LCM's first step takes its clean-latent prediction `(x - sqrt(1 - abar) eps) / sqrt(abar)`
/// at t = 999 (`sqrt(abar)` = 0.068: the prediction's differences times 14.7) as the sample it
/// re-noises. Over four steps from pure noise, any change of rounding (a kernel, a summation
/// order, an exponential's last bit) moves where these cases end by tens of percent of 1e-4:
/// onnxruntime on the same graphs ends 5.3e-5 to 9.2e-5 from PyTorch on them
/// (`ort_final_latent_max_abs_diff` in cases.json), tract's composition with its AVX-512 kernels
/// under 1e-4, with its AVX2 kernels (a 2-core AMD EPYC) 8.8e-5 to 1.13e-4, the fused attention
/// (`diffusionx_engine::fuse_attention`) on the AVX2 kernels 9.9e-5 to 1.40e-4 (docs/kiosk.md).
/// The unamplified cases stay at 1e-4 and reach 4.5e-5 at most.
const AMPLIFIED_LATENT_TOLERANCE: f32 = 2e-4;

#[test]
fn every_reference_case_matches_diffusers_on_packed_weights() {
    every_reference_case_matches_diffusers(Products::Packed);
}

#[test]
fn every_reference_case_matches_diffusers_on_gemms_kernels() {
    every_reference_case_matches_diffusers(Products::Gemm);
}

#[test]
fn every_reference_case_matches_diffusers_on_tracts_kernels() {
    every_reference_case_matches_diffusers(Products::Tract);
}

// Prints what each case reaches (the numbers in docs/kiosk.md), as the tests calling it may.
#[allow(clippy::print_stdout)]
fn every_reference_case_matches_diffusers(products: Products) {
    let pipeline = tiny_pipeline(products);
    let reference = fixtures().join("tiny-sd-reference");
    // Python's json writes diffusers' `-Infinity` defaults, which are not JSON; no key read here
    // holds one.
    let text = std::fs::read_to_string(reference.join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text.replace("-Infinity", "null")).unwrap();
    let mut checked = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        let dir = reference.join(name);
        let files: Vec<&str> = case["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let guidance = case["guidance_scale"].as_f64().unwrap() as f32;
        let prompt = case["prompt"].as_str().unwrap().to_string();
        let negative = case["negative_prompt"].as_str().unwrap_or("").to_string();

        // Token ids and embeddings: [uncond; cond] with guidance, [cond] without.
        let ids = npy::read::<i64>(&dir.join("prompt_ids.npy")).unwrap();
        let embeds = f32s(&dir, "prompt_embeds.npy");
        let texts: Vec<&str> = if guidance > 1.0 {
            vec![&negative, &prompt]
        } else {
            vec![&prompt]
        };
        assert_eq!(ids.shape, [texts.len(), 77], "{name}: ids shape");
        for (row, text) in texts.iter().enumerate() {
            let ours: Vec<i64> = pipeline
                .tokenizer()
                .encode(text)
                .unwrap()
                .iter()
                .map(|&i| i64::from(i))
                .collect();
            assert_eq!(
                ours,
                ids.data[row * 77..(row + 1) * 77],
                "{name}: ids of {text:?}"
            );
            let emb = pipeline.encode_text(text).unwrap();
            let want = &embeds[row * emb.len()..(row + 1) * emb.len()];
            let diff = max_abs_diff(&emb, want);
            assert!(
                diff <= EMBEDDING_TOLERANCE,
                "{name}: embedding of {text:?} differs by {diff}"
            );
        }

        let noise = f32s(&dir, "init_noise.npy");
        let start = match case["mode"].as_str().unwrap() {
            "t2i" => Start::Noise(Some(noise)),
            "img2img" => Start::Latent {
                latent: f32s(&dir, "init_latent.npy"),
                noise_level: NoiseLevel::from_fraction(case["strength"].as_f64().unwrap() as f32)
                    .unwrap(),
                noise: Some(noise),
            },
            other => panic!("{name}: unknown mode {other}"),
        };
        let step_noise: Vec<Vec<f32>> = (0..)
            .map(|k| format!("step_noise{k}.npy"))
            .take_while(|f| files.contains(&f.as_str()))
            .map(|f| f32s(&dir, &f))
            .collect();
        let request = Request {
            prompt: prompt.clone(),
            negative_prompt: negative.clone(),
            seed: case["seed"].as_u64().unwrap(),
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as u16,
            guidance_scale: guidance,
            scheduler: kind(case["scheduler"].as_str().unwrap()),
            start,
            step_noise: (!step_noise.is_empty()).then_some(step_noise),
            decode: if files.contains(&"image.npy") {
                Decode::Vae
            } else {
                Decode::Skip
            },
        };

        let amplified = case["mode"] == "t2i"
            && (guidance > 1.0 || case["scheduler"].as_str() == Some("LCMScheduler"));
        let latent_tolerance = if amplified {
            AMPLIFIED_LATENT_TOLERANCE
        } else {
            LATENT_TOLERANCE
        };
        let mut step_diffs = Vec::new();
        let outcome = pipeline
            .generate(&request, &mut |p| {
                let want = f32s(&dir, &format!("latents_step{}.npy", p.step - 1));
                step_diffs.push(max_abs_diff(p.sample, &want));
                ControlFlow::Continue(())
            })
            .unwrap();
        let Outcome::Finished(generation) = outcome else {
            panic!("{name}: cancelled")
        };
        let want_timesteps = f32s(&dir, "timesteps.npy");
        assert_eq!(
            generation.steps_run,
            want_timesteps.len(),
            "{name}: steps run"
        );
        let final_diff = max_abs_diff(&generation.latent, &f32s(&dir, "final_latent.npy"));
        let image_diff = generation
            .image_f32
            .as_ref()
            .map(|img| max_abs_diff(img, &f32s(&dir, "image.npy")));
        println!(
            "{products}: {name}: per-step max abs diff {step_diffs:?}, final {final_diff:e}, image {image_diff:?}"
        );
        assert!(
            step_diffs.iter().all(|d| *d <= latent_tolerance),
            "{name}: steps {step_diffs:?}"
        );
        assert!(
            final_diff <= latent_tolerance,
            "{name}: final latent differs by {final_diff}"
        );
        if let Some(diff) = image_diff {
            assert!(diff <= IMAGE_TOLERANCE, "{name}: image differs by {diff}");
        }
        checked += 1;
    }
    assert_eq!(checked, 11, "every case of cases.json was checked");
}

/// The tiny VAE decoder against PyTorch on the same f32 weights (onnxruntime reaches 8e-7 on
/// this graph; see `max_abs_diff_vs_torch` in the manifest). What tract reaches is in
/// docs/kiosk.md.
const TINY_DECODER_TOLERANCE: f32 = 1e-5;

#[test]
fn the_tiny_vae_decoder_matches_diffusers_autoencoder_tiny() {
    let dir = fixtures().join("tiny-sd-reference/tiny_vae_decoder");
    let latent = npy::read::<f32>(&dir.join("latent.npy")).unwrap();
    let expected = npy::read::<f32>(&dir.join("image.npy")).unwrap();
    // A 16 x 12 latent: not square, so a transposed plane would show.
    assert_eq!(latent.shape, [4, 16, 12]);
    assert_eq!(expected.shape, [3, 128, 96]);
    for products in [Products::Packed, Products::Gemm, Products::Tract] {
        let got = tiny_pipeline(products)
            .decode_tiny(&latent.data, 16, 12)
            .unwrap();
        let diff = max_abs_diff(&got, &expected.data);
        println!("{products}: tiny VAE decoder: max abs diff {diff:e}");
        assert!(diff <= TINY_DECODER_TOLERANCE, "{products}: {diff:e}");
    }
    // The reference has structure to compare (not a flat image).
    let mean = expected.data.iter().sum::<f32>() / expected.data.len() as f32;
    let spread = expected
        .data
        .iter()
        .map(|x| (x - mean).abs())
        .fold(0.0, f32::max);
    assert!(spread > 0.5, "{spread}");
}
