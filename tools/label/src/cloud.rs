//! Steps 2 and 3: the gateway's refinement of the preview at a level, as `gatewayd` runs it.

use std::ops::ControlFlow;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_refine::{RefineJob, Refined, Refiner};

use crate::error::LabelError;

/// The cloud job's settings (the kiosk's `[gateway]` section and the scheduler it sends).
#[derive(Debug, Clone, PartialEq)]
pub struct CloudSettings {
    /// Steps `N` of the full cloud schedule; a level `s` runs `floor(N * s)` of them.
    pub steps: u16,
    /// Classifier-free guidance of the cloud job.
    pub guidance_scale: f32,
    /// The cloud scheduler.
    pub scheduler: SchedulerKind,
}

impl Default for CloudSettings {
    /// 50 steps, guidance 7.5, DDIM (the scheduler the kiosk sends).
    fn default() -> Self {
        Self {
            steps: 50,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
        }
    }
}

/// The preview latent as the gateway receives it: the kiosk sends it as IEEE half floats
/// (`LatentData::F16`) and the gateway widens it back to `f32`.
pub fn wire_latent(latent: &[f32]) -> Vec<f32> {
    latent
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}

/// What the gateway returns for the preview of `prompt` and `seed` refined at `level`: the
/// latent re-noised with the job's seed, `floor(N * level)` steps under the prompt with the
/// cloud's guidance, decoded. `latent` is the wire latent, `[4, h, w]`.
pub fn refine_at(
    refiner: &Refiner,
    prompt: &str,
    seed: u64,
    (latent_height, latent_width): (usize, usize),
    latent: &[f32],
    level: NoiseLevel,
    settings: &CloudSettings,
) -> Result<Refined, LabelError> {
    let job = RefineJob {
        prompt: prompt.to_owned(),
        negative_prompt: String::new(),
        seed,
        latent_height,
        latent_width,
        steps: settings.steps,
        noise_level: level,
        guidance_scale: settings.guidance_scale,
        scheduler: settings.scheduler,
        latent: latent.to_vec(),
        decode: true,
    };
    Ok(refiner
        .refine(&job, &mut |_| ControlFlow::Continue(()))?
        .expect("the progress callback never stops the run"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_latent_is_rounded_to_half_precision() {
        // 1 + 2^-11 is halfway between two halves and rounds to even (1.0); 65504 is the
        // largest half; 1/3 becomes the nearest half, 0.333251953125.
        let wire = wire_latent(&[1.0 + 2f32.powi(-11), 65504.0, 1.0 / 3.0, -0.0]);
        assert_eq!(wire, [1.0, 65504.0, 0.333_251_95, -0.0]);
    }
}
