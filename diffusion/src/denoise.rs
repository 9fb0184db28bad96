//! The denoising loop, shared by every backend: the kiosk's tract engine and the gateway's
//! candle engine differ only in how they predict noise.

use std::ops::ControlFlow;

use crate::scheduler::Scheduler;

/// Reported after every step of [`denoise`].
#[derive(Debug)]
pub struct StepReport<'a> {
    /// Steps done, 1..=total.
    pub step: usize,
    /// Steps this run takes.
    pub total: usize,
    /// The scheduler's prediction of the clean latent after this step (for live previews).
    pub denoised: &'a [f32],
    /// The sample after this step.
    pub sample: &'a [f32],
}

/// How a [`denoise`] run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denoised {
    /// Every step ran.
    Finished,
    /// The progress callback stopped the run after `after_step` steps.
    Cancelled {
        /// Steps finished.
        after_step: usize,
    },
}

/// Runs every step of `scheduler` on `sample` in place. `predict` gets the scaled model input
/// and the timestep and returns the noise prediction (guidance already applied); `step_noise`
/// gives the fresh noise of step `k` for schedulers that draw it; `progress` sees every step and
/// may stop the run between steps.
pub fn denoise<E>(
    scheduler: &mut Scheduler,
    sample: &mut [f32],
    mut predict: impl FnMut(&[f32], f32) -> Result<Vec<f32>, E>,
    mut step_noise: impl FnMut(usize) -> Result<Vec<f32>, E>,
    mut progress: impl FnMut(&StepReport<'_>) -> ControlFlow<()>,
) -> Result<Denoised, E> {
    let timesteps = scheduler.timesteps().to_vec();
    let mut scaled = vec![0.0f32; sample.len()];
    for (i, &t) in timesteps.iter().enumerate() {
        scheduler.scale_model_input(sample, i, &mut scaled);
        let noise_pred = predict(&scaled, t)?;
        let noise = if scheduler.step_needs_noise(i) {
            Some(step_noise(i)?)
        } else {
            None
        };
        let out = scheduler.step(&noise_pred, i, sample, noise.as_deref());
        let report = StepReport {
            step: i + 1,
            total: timesteps.len(),
            denoised: out.pred_original_sample,
            sample,
        };
        if progress(&report).is_break() {
            return Ok(Denoised::Cancelled { after_step: i + 1 });
        }
    }
    Ok(Denoised::Finished)
}

/// Classifier-free guidance: `uncond + scale * (cond - uncond)`.
pub fn guide(uncond: &[f32], cond: &[f32], scale: f32) -> Vec<f32> {
    uncond
        .iter()
        .zip(cond)
        .map(|(u, c)| u + scale * (c - u))
        .collect()
}
