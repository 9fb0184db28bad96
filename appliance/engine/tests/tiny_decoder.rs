//! The optional tiny VAE decoder (TAESD's layout, `tiny_vae_decoder/` in the model folder) in
//! the pipeline: as the final decoder and as a full-size preview of every step. Against
//! diffusers' `AutoencoderTiny` it is in `tests/conformance.rs`, a folder without one in
//! `tests/folder.rs`.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{Decode, EngineConfig, Outcome, Pipeline, Request, Start, decoded_to_rgb};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        Pipeline::load(
            &fixtures().join("tiny-sd"),
            &EngineConfig {
                threads: 1,
                ..EngineConfig::default()
            },
        )
        .unwrap()
    })
}

fn request(decode: Decode) -> Request {
    Request {
        prompt: "a harbour at noon".into(),
        negative_prompt: String::new(),
        seed: 11,
        width: 320,
        height: 256,
        steps: 3,
        guidance_scale: 1.0,
        scheduler: SchedulerKind::Ddim,
        start: Start::Noise(None),
        step_noise: None,
        decode,
    }
}

#[test]
fn every_step_can_preview_through_the_tiny_decoder_at_full_size() {
    let pipeline = pipeline();
    assert!(pipeline.has_tiny_vae_decoder());
    let mut previews = Vec::new();
    let outcome = pipeline
        .generate(&request(Decode::Skip), &mut |p| {
            let preview = p.tiny_preview().unwrap().unwrap();
            let decoded = pipeline.decode_tiny(p.denoised, 32, 40).unwrap();
            assert_eq!(preview, decoded_to_rgb(&decoded, 256, 320));
            previews.push((preview.width, preview.height, preview.pixels));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    assert_eq!(previews.len(), 3);
    for (width, height, pixels) in &previews {
        assert_eq!((*width, *height, pixels.len()), (320, 256, 320 * 256 * 3));
    }
    assert_ne!(
        previews[0].2, previews[2].2,
        "the preview follows the denoising"
    );
}

#[test]
fn the_final_image_comes_from_the_decoder_the_request_names() {
    let finish = |decode| match pipeline()
        .generate(&request(decode), &mut |_| ControlFlow::Continue(()))
        .unwrap()
    {
        Outcome::Finished(generation) => generation,
        Outcome::Cancelled { .. } => panic!("not cancelled"),
    };
    let tiny = finish(Decode::Tiny);
    let vae = finish(Decode::Vae);
    assert_eq!(
        tiny.latent, vae.latent,
        "the decoder does not touch the denoising"
    );
    let decoded = pipeline().decode_tiny(&tiny.latent, 32, 40).unwrap();
    assert_eq!(tiny.image, Some(decoded_to_rgb(&decoded, 256, 320)));
    let unit: Vec<f32> = decoded
        .iter()
        .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    assert_eq!(tiny.image_f32, Some(unit));
    let from_vae = pipeline().decode(&vae.latent, 32, 40).unwrap();
    assert_eq!(vae.image, Some(decoded_to_rgb(&from_vae, 256, 320)));
    assert_ne!(tiny.image, vae.image, "two different decoders");
}
