//! One refinement: re-noise the kiosk's latent, denoise the remaining steps, decode.

use std::ops::ControlFlow;

use candle_core::Tensor;
use diffusionx_diffusion::{
    Denoised, NoiseLevel, STREAM_RENOISE, Scheduler, SchedulerKind, StepReport, denoise,
    gaussian_noise, guide, lcm_step_stream,
};
use diffusionx_text::CONTEXT;

use crate::error::RefineError;
use crate::model::Refiner;

/// Latent channels of the SD-1.x VAE.
const CHANNELS: usize = 4;

/// A refinement job, as the wire protocol's `RefineRequest` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefineJob {
    /// The final prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// Seed of the re-noising noise (stream 1 of the shared generator) and of LCM's step noise.
    pub seed: u64,
    /// Latent height (image height / 8).
    pub latent_height: usize,
    /// Latent width (image width / 8).
    pub latent_width: usize,
    /// Steps of the full schedule.
    pub steps: u16,
    /// How much of the preview to redo.
    pub noise_level: NoiseLevel,
    /// Classifier-free guidance scale; at most 1 disables guidance.
    pub guidance_scale: f32,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// The kiosk's latent, scaled, `[4, h, w]`.
    pub latent: Vec<f32>,
    /// Decode the refined latent with the VAE.
    pub decode: bool,
}

/// A finished refinement.
#[derive(Debug, Clone, PartialEq)]
pub struct Refined {
    /// The refined latent, scaled, `[4, h, w]`.
    pub latent: Vec<f32>,
    /// The decoded image `[3, 8h, 8w]` in [0, 1], when asked for.
    pub image: Option<Vec<f32>>,
    /// Denoising steps run.
    pub steps_run: usize,
}

impl Refiner {
    /// The CLIP text encoder's last hidden state for `text`, `[1, 77, hidden]`. One prompt per
    /// call: candle-transformers 0.11.1's CLIP fails on a batch of prompts.
    pub fn encode_text(&self, text: &str) -> Result<Tensor, RefineError> {
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::from_vec(ids, (1, CONTEXT), &self.device)
            .map_err(RefineError::run("tokens"))?;
        self.text_encoder
            .forward_with_mask(&ids, usize::MAX)
            .map_err(RefineError::run("text encoder"))
    }

    /// Runs `job`; `progress` sees every step and may stop the run between steps (`None`).
    pub fn refine(
        &self,
        job: &RefineJob,
        progress: &mut dyn FnMut(&StepReport<'_>) -> ControlFlow<()>,
    ) -> Result<Option<Refined>, RefineError> {
        let (h, w) = (job.latent_height, job.latent_width);
        let len = CHANNELS * h * w;
        if job.latent.len() != len {
            return Err(RefineError::InvalidJob(format!(
                "latent has {} values, {h}x{w} needs {len}",
                job.latent.len()
            )));
        }
        let guided = job.guidance_scale > 1.0;
        let cond = self.encode_text(&job.prompt)?;
        let embeddings = if guided {
            let uncond = self.encode_text(&job.negative_prompt)?;
            Tensor::cat(&[&uncond, &cond], 0).map_err(RefineError::run("text encoder"))?
        } else {
            cond
        };

        let mut scheduler = Scheduler::for_img2img(
            job.scheduler,
            &self.scheduler_config,
            usize::from(job.steps),
            job.noise_level,
        )
        .map_err(|e| RefineError::InvalidJob(e.to_string()))?;
        let mut noise = vec![0.0f32; len];
        gaussian_noise(job.seed, STREAM_RENOISE, &mut noise);
        let mut sample = vec![0.0f32; len];
        scheduler.add_noise(&job.latent, &noise, &mut sample);
        let steps_run = scheduler.timesteps().len();

        let predict = |scaled: &[f32], t: f32| -> Result<Vec<f32>, RefineError> {
            let unet = RefineError::run("UNet");
            let x = Tensor::from_slice(scaled, (1, CHANNELS, h, w), &self.device).map_err(&unet)?;
            let input = if guided {
                Tensor::cat(&[&x, &x], 0).map_err(&unet)?
            } else {
                x
            };
            let out = self
                .unet
                .forward(&input, f64::from(t), &embeddings)
                .map_err(&unet)?;
            let out: Vec<f32> = out.flatten_all().and_then(|o| o.to_vec1()).map_err(&unet)?;
            Ok(if guided {
                guide(&out[..len], &out[len..], job.guidance_scale)
            } else {
                out
            })
        };
        let step_noise = |step: usize| -> Result<Vec<f32>, RefineError> {
            let mut noise = vec![0.0f32; len];
            gaussian_noise(job.seed, lcm_step_stream(step), &mut noise);
            Ok(noise)
        };
        if let Denoised::Cancelled { .. } =
            denoise(&mut scheduler, &mut sample, predict, step_noise, |r| {
                progress(r)
            })?
        {
            return Ok(None);
        }
        let image = if job.decode {
            Some(self.decode(&sample, h, w)?)
        } else {
            None
        };
        Ok(Some(Refined {
            latent: sample,
            image,
            steps_run,
        }))
    }

    /// VAE-decodes a scaled latent to `[3, 8h, 8w]` in [0, 1] (diffusers' `(x / 2 + 0.5).clamp(0, 1)`).
    pub fn decode(&self, latent: &[f32], h: usize, w: usize) -> Result<Vec<f32>, RefineError> {
        let vae = RefineError::run("VAE decoder");
        let x = Tensor::from_slice(latent, (1, CHANNELS, h, w), &self.device).map_err(&vae)?;
        let x = (x / self.scaling_factor).map_err(&vae)?;
        let image = self.vae.decode(&x).map_err(&vae)?;
        let image = ((image / 2.0).map_err(&vae)? + 0.5)
            .map_err(&vae)?
            .clamp(0f32, 1f32)
            .map_err(&vae)?;
        image.flatten_all().and_then(|i| i.to_vec1()).map_err(&vae)
    }
}
