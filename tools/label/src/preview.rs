//! Step 1: the edge preview exactly as the kiosk makes it, and its features.

use std::ops::ControlFlow;

use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{Decode, Outcome, Pipeline, Request, Start};
use diffusionx_predictor::{Observation, X0History, latent_stats};

use crate::error::LabelError;

/// The kiosk's preview settings (`[model]` in its config file; the defaults are the kiosk's).
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewSettings {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Denoising steps of the preview.
    pub steps: u16,
    /// Guidance of the preview (at most 1: none).
    pub guidance_scale: f32,
    /// The preview scheduler.
    pub scheduler: SchedulerKind,
}

impl Default for PreviewSettings {
    /// The kiosk's defaults: 256x256, 4 steps, no guidance, DDIM.
    fn default() -> Self {
        Self {
            width: 256,
            height: 256,
            steps: 4,
            guidance_scale: 1.0,
            scheduler: SchedulerKind::Ddim,
        }
    }
}

impl PreviewSettings {
    /// The kiosk's text-to-image request for `prompt` and `seed` (no negative prompt, noise
    /// from the seed; not decoded, as only the latent goes to the cloud).
    pub fn request(&self, prompt: &str, seed: u64) -> Request {
        Request {
            prompt: prompt.to_owned(),
            negative_prompt: String::new(),
            seed,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler,
            start: Start::Noise(None),
            step_noise: None,
            decode: Decode::Skip,
        }
    }
}

/// A finished preview and what the predictor observes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// The final latent, scaled, `[4, h, w]`, as the engine returned it.
    pub latent: Vec<f32>,
    /// `[channels, height, width]` of the latent.
    pub latent_shape: [usize; 3],
    /// The raw facts the features are made of (a single round: no previous prompt).
    pub observation: Observation,
}

/// Runs the kiosk's preview of `prompt` with `seed`, recording every step's predicted clean
/// latent in an [`X0History`], and assembles its [`Observation`] as the kiosk does at finalize
/// (the prompt's facts from [`Pipeline::prompt_facts`], one round).
pub fn edge_preview(
    pipeline: &Pipeline,
    prompt: &str,
    seed: u64,
    settings: &PreviewSettings,
) -> Result<Preview, LabelError> {
    let mut history = X0History::new();
    let outcome = pipeline.generate(&settings.request(prompt, seed), &mut |progress| {
        history.push(progress.denoised);
        ControlFlow::Continue(())
    })?;
    let Outcome::Finished(generation) = outcome else {
        unreachable!("the progress callback never stops the run");
    };
    let facts = pipeline.prompt_facts(prompt)?;
    let observation = Observation {
        pooled: facts.pooled,
        previous_pooled: None,
        prompt_tokens: facts.tokens,
        rounds: 1,
        latent: latent_stats(&generation.latent)?,
        x0_change: history.change()?,
        width: u32::try_from(settings.width).expect("the engine accepted the width"),
        height: u32::try_from(settings.height).expect("the engine accepted the height"),
        edge_steps: u32::try_from(generation.steps_run).expect("at most u16::MAX steps"),
    };
    Ok(Preview {
        latent: generation.latent,
        latent_shape: generation.latent_shape,
        observation,
    })
}
