//! What the kiosk's integration tests share: the committed tiny model and a kiosk shell on it.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::path::{Path, PathBuf};

use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{Decode, EngineConfig, Pipeline};
use diffusionx_fleet::{NoisePolicy, PromptPrivacy};
use diffusionx_kiosk::cloud::Link;
use diffusionx_kiosk::engine::EngineSettings;
use diffusionx_kiosk::records::RecordStore;
use diffusionx_kiosk::runner::{CloudSettings, Kiosk, KioskParts};
use diffusionx_kiosk::session::SessionConfig;
use diffusionx_protocol::Scheduler;
use diffusionx_ui::{Layout, Panel};

/// The committed tiny Tiny-SD model (with the tiny VAE decoder).
pub(crate) fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd")
}

/// The tiny model on one thread.
pub(crate) fn load() -> Pipeline {
    Pipeline::load(
        &model(),
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .expect("the committed tiny model loads")
}

/// 256 px previews and local refinements of 4 DDIM steps, with these preview decoders.
pub(crate) fn engine_settings(preview_decode: Decode, tiny_step_previews: bool) -> EngineSettings {
    EngineSettings {
        width: 256,
        height: 256,
        preview_guidance: 1.0,
        scheduler: SchedulerKind::Ddim,
        refine_steps: 4,
        refine_guidance: 7.5,
        preview_decode,
        tiny_step_previews,
    }
}

/// A kiosk on an 800x480 headless display keeping its records in `records`, refining in the
/// cloud through `link` (locally without one).
pub(crate) fn kiosk(records: RecordStore, link: Option<Link>) -> Kiosk {
    Kiosk::new(KioskParts {
        session: SessionConfig::default(),
        pipeline: load(),
        engine: engine_settings(Decode::Tiny, false),
        link,
        cloud: CloudSettings {
            steps: 4,
            guidance_scale: 7.5,
            scheduler: Scheduler::Ddim,
        },
        layout: Layout::new(Panel {
            width_px: 800,
            height_px: 480,
            width_mm: None,
        })
        .expect("800x480 is a panel"),
        records,
        snapshots: None,
        fleet: None,
        noise_policy: NoisePolicy::default(),
        predictor: None,
        privacy: PromptPrivacy::Full,
    })
    .expect("the kiosk starts")
}
