//! The engine thread's previews: what each step shows and what decodes the preview's picture,
//! as `[model] step_previews` and `preview_decoder` choose, on the committed tiny model (which
//! has the tiny VAE decoder).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod common;

use diffusionx_engine::{Decode, decoded_to_rgb};
use diffusionx_kiosk::engine::EngineWorker;
use diffusionx_kiosk::session::Event;

/// One preview round on a worker with these decoders: each step's image size, and the
/// finished preview's picture and latent.
fn preview(
    preview_decode: Decode,
    tiny_step_previews: bool,
) -> (Vec<(u32, u32)>, diffusionx_ui::RgbImage, Vec<f32>) {
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let mut worker = EngineWorker::spawn(
        common::load(),
        common::engine_settings(preview_decode, tiny_step_previews),
        events,
    )
    .unwrap();
    worker.preview(1, "a paper boat on a pond".into(), 5, 3);
    let mut steps = Vec::new();
    loop {
        match received.blocking_recv().unwrap() {
            Event::PreviewStep { image, .. } => steps.push((image.width(), image.height())),
            Event::PreviewDone { image, latent, .. } => return (steps, image, latent),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn rgb(image: diffusionx_engine::RgbImage) -> diffusionx_ui::RgbImage {
    diffusionx_ui::RgbImage::from_raw(image.width as u32, image.height as u32, image.pixels)
        .unwrap()
}

#[test]
fn steps_show_the_latent_map_or_the_tiny_decoder_as_configured() {
    let (steps, _, _) = preview(Decode::Tiny, false);
    assert_eq!(steps, [(32, 32); 3], "the linear map, 1/8 of the picture");
    let (steps, _, _) = preview(Decode::Tiny, true);
    assert_eq!(steps, [(256, 256); 3], "the tiny decoder, full size");
}

#[test]
fn the_preview_picture_comes_from_the_configured_decoder() {
    let pipeline = common::load();
    let (_, tiny, latent) = preview(Decode::Tiny, false);
    let decoded = pipeline.decode_tiny(&latent, 32, 32).unwrap();
    assert_eq!(tiny, rgb(decoded_to_rgb(&decoded, 256, 256)));
    let (_, vae, same_latent) = preview(Decode::Vae, false);
    assert_eq!(same_latent, latent, "the same seed and prompt");
    let decoded = pipeline.decode(&latent, 32, 32).unwrap();
    assert_eq!(vae, rgb(decoded_to_rgb(&decoded, 256, 256)));
    assert_ne!(tiny, vae);
}
