//! One refinement: re-noise the kiosk's latent, denoise the remaining steps, decode.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use diffusionx_diffusion::{
    NoiseLevel, STREAM_RENOISE, Scheduler, SchedulerKind, StepReport, gaussian_noise, guide,
    lcm_step_stream,
};
use diffusionx_text::CONTEXT;

use crate::error::RefineError;
use crate::model::Refiner;

/// Latent channels of the SD-1.x VAE.
const CHANNELS: usize = 4;

/// Images one VAE call decodes at most on a GPU (8 at 512 px: ~5 GiB of f16 activations).
const MAX_GPU_DECODE_BATCH: usize = 8;

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

/// A job in flight: its text embeddings, scheduler state and current sample. Made by
/// [`Refiner::start`], advanced by [`Refiner::step_batch`], closed by [`Refiner::finish`].
pub struct RefineTask {
    latent_height: usize,
    latent_width: usize,
    guidance_scale: f32,
    guided: bool,
    seed: u64,
    decode: bool,
    /// `[rows, 77, d]`: the negative then the positive prompt when guided, else the prompt.
    embeddings: Tensor,
    scheduler: Scheduler,
    sample: Vec<f32>,
    denoised: Vec<f32>,
    done: usize,
    total: usize,
}

impl std::fmt::Debug for RefineTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefineTask")
            .field("latent", &(self.latent_height, self.latent_width))
            .field("done", &self.done)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl RefineTask {
    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// Steps this task runs in all.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// Whether every step has run.
    pub fn is_finished(&self) -> bool {
        self.done == self.total
    }

    /// `(height, width)` of the latent; only tasks of one size share a batch.
    pub fn latent_size(&self) -> (usize, usize) {
        (self.latent_height, self.latent_width)
    }

    /// UNet rows this task takes in a batch: 2 with guidance, else 1.
    pub fn rows(&self) -> usize {
        if self.guided { 2 } else { 1 }
    }

    /// The current sample, scaled, `[4, h, w]`.
    pub fn sample(&self) -> &[f32] {
        &self.sample
    }

    /// The scheduler's prediction of the clean latent after the last step (for previews).
    pub fn denoised(&self) -> &[f32] {
        &self.denoised
    }
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

    /// Starts `job`: encodes its prompts and re-noises its latent with the job's seed. The task
    /// is then advanced by [`Refiner::step_batch`], alone or with other tasks of the same size,
    /// and closed by [`Refiner::finish`].
    pub fn start(&self, job: &RefineJob) -> Result<RefineTask, RefineError> {
        let (h, w) = (job.latent_height, job.latent_width);
        let len = CHANNELS * h * w;
        if job.latent.len() != len {
            return Err(RefineError::InvalidJob(format!(
                "latent has {} values, {h}x{w} needs {len}",
                job.latent.len()
            )));
        }
        if let Some(bad) = job.latent.iter().find(|v| !v.is_finite()) {
            return Err(RefineError::InvalidJob(format!(
                "latent holds a non-finite value ({bad})"
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
        let scheduler = Scheduler::for_img2img(
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
        Ok(RefineTask {
            latent_height: h,
            latent_width: w,
            guidance_scale: job.guidance_scale,
            guided,
            seed: job.seed,
            decode: job.decode,
            embeddings,
            total: scheduler.timesteps().len(),
            scheduler,
            denoised: sample.clone(),
            sample,
            done: 0,
        })
    }

    /// Advances every task in `tasks` by one denoising step with a single UNet call (each task
    /// at its own timestep: continuous batching). All tasks must be unfinished and share one
    /// latent size. The result for each task is the same as stepping it alone.
    pub fn step_batch(&self, tasks: &mut [&mut RefineTask]) -> Result<(), RefineError> {
        let Some(first) = tasks.first() else {
            return Ok(());
        };
        let (h, w) = (first.latent_height, first.latent_width);
        if let Some(other) = tasks
            .iter()
            .find(|t| (t.latent_height, t.latent_width) != (h, w))
        {
            return Err(RefineError::InvalidJob(format!(
                "a batch holds one latent size: {h}x{w} and {}x{}",
                other.latent_height, other.latent_width
            )));
        }
        if tasks.iter().any(|t| t.is_finished()) {
            return Err(RefineError::InvalidJob(
                "a finished task cannot be stepped".into(),
            ));
        }
        let unet = RefineError::run("UNet");
        let len = CHANNELS * h * w;
        let rows: usize = tasks.iter().map(|t| t.rows()).sum();
        let mut input = Vec::with_capacity(rows * len);
        let mut timesteps = Vec::with_capacity(rows);
        let mut scaled = vec![0.0f32; len];
        for task in tasks.iter() {
            task.scheduler
                .scale_model_input(&task.sample, task.done, &mut scaled);
            let t = task.scheduler.timesteps()[task.done];
            for _ in 0..task.rows() {
                input.extend_from_slice(&scaled);
                timesteps.push(t);
            }
        }
        let x = Tensor::from_vec(input, (rows, CHANNELS, h, w), &self.device)
            .and_then(|x| x.to_dtype(self.dtype))
            .map_err(&unet)?;
        let t = Tensor::from_vec(timesteps, rows, &self.device).map_err(&unet)?;
        let embeddings: Vec<&Tensor> = tasks.iter().map(|t| &t.embeddings).collect();
        let embeddings = Tensor::cat(&embeddings, 0).map_err(&unet)?;
        let out: Vec<f32> = self
            .unet
            .forward(&x, &t, &embeddings)
            .and_then(|o| o.to_dtype(DType::F32))
            .and_then(|o| o.flatten_all())
            .and_then(|o| o.to_vec1())
            .map_err(&unet)?;
        let mut offset = 0;
        for task in tasks.iter_mut() {
            let i = task.done;
            let prediction = if task.guided {
                let uncond = &out[offset..offset + len];
                let cond = &out[offset + len..offset + 2 * len];
                guide(uncond, cond, task.guidance_scale)
            } else {
                out[offset..offset + len].to_vec()
            };
            offset += task.rows() * len;
            let noise = task.scheduler.step_needs_noise(i).then(|| {
                let mut noise = vec![0.0f32; len];
                gaussian_noise(task.seed, lcm_step_stream(i), &mut noise);
                noise
            });
            let RefineTask {
                scheduler,
                sample,
                denoised,
                ..
            } = &mut **task;
            let step = scheduler.step(&prediction, i, sample, noise.as_deref());
            denoised.copy_from_slice(step.pred_original_sample);
            task.done += 1;
        }
        Ok(())
    }

    /// Closes a finished task: the refined latent and, when the job asked, its decoded image.
    pub fn finish(&self, task: RefineTask) -> Result<Refined, RefineError> {
        self.finish_all(vec![task], 1)
            .pop()
            .expect("one result per task")
    }

    /// How many images one VAE call should decode on this refiner's device: on a GPU one call
    /// of several images costs far less than as many calls of one; on the CPU it costs the same
    /// time and more memory (a 512 px image holds ~1 GiB of f32 activations), so one.
    pub fn decode_batch_limit(&self) -> usize {
        if self.device.is_cpu() {
            1
        } else {
            MAX_GPU_DECODE_BATCH
        }
    }

    /// Closes finished tasks, one result per task in order. The images of tasks of the same
    /// size are decoded together, up to `max_batch` per VAE call
    /// ([`Refiner::decode_batch_limit`]). A task that is not finished fails only its own
    /// result; a failed decode fails its group's.
    pub fn finish_all(
        &self,
        tasks: Vec<RefineTask>,
        max_batch: usize,
    ) -> Vec<Result<Refined, RefineError>> {
        let mut images: Vec<Option<Result<Vec<f32>, RefineError>>> = Vec::new();
        images.resize_with(tasks.len(), || None);
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (index, task) in tasks.iter().enumerate() {
            if !task.decode || !task.is_finished() {
                continue;
            }
            let size = (task.latent_height, task.latent_width);
            match groups
                .iter_mut()
                .find(|(s, members)| *s == size && members.len() < max_batch.max(1))
            {
                Some((_, members)) => members.push(index),
                None => groups.push((size, vec![index])),
            }
        }
        for ((h, w), members) in groups {
            let latents: Vec<&[f32]> = members.iter().map(|&i| &tasks[i].sample[..]).collect();
            match self.decode_many(&latents, h, w) {
                Ok(decoded) => {
                    for (i, image) in members.iter().zip(decoded) {
                        images[*i] = Some(Ok(image));
                    }
                }
                Err(e) => {
                    let message = match &e {
                        RefineError::Run { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    for i in members {
                        images[i] = Some(Err(RefineError::Run {
                            stage: "VAE decoder",
                            source: candle_core::Error::Msg(message.clone()),
                        }));
                    }
                }
            }
        }
        tasks
            .into_iter()
            .zip(images)
            .map(|(task, image)| {
                if !task.is_finished() {
                    return Err(RefineError::InvalidJob(format!(
                        "finish after {} of {} steps",
                        task.done, task.total
                    )));
                }
                Ok(Refined {
                    image: image.transpose()?,
                    latent: task.sample,
                    steps_run: task.total,
                })
            })
            .collect()
    }

    /// Runs `job` alone; `progress` sees every step and may stop the run between steps (`None`).
    pub fn refine(
        &self,
        job: &RefineJob,
        progress: &mut dyn FnMut(&StepReport<'_>) -> ControlFlow<()>,
    ) -> Result<Option<Refined>, RefineError> {
        let mut task = self.start(job)?;
        while !task.is_finished() {
            self.step_batch(&mut [&mut task])?;
            let report = StepReport {
                step: task.done,
                total: task.total,
                denoised: &task.denoised,
                sample: &task.sample,
            };
            if progress(&report).is_break() {
                return Ok(None);
            }
        }
        self.finish(task).map(Some)
    }

    /// VAE-decodes a scaled latent to `[3, 8h, 8w]` in [0, 1] (diffusers' `(x / 2 + 0.5).clamp(0, 1)`).
    pub fn decode(&self, latent: &[f32], h: usize, w: usize) -> Result<Vec<f32>, RefineError> {
        Ok(self
            .decode_many(&[latent], h, w)?
            .pop()
            .expect("one image per latent"))
    }

    /// Decodes `latents` (each `[4, h, w]`) in one VAE call: images `[3, 8h, 8w]` in [0, 1].
    pub fn decode_many(
        &self,
        latents: &[&[f32]],
        h: usize,
        w: usize,
    ) -> Result<Vec<Vec<f32>>, RefineError> {
        let vae = RefineError::run("VAE decoder");
        let n = latents.len();
        let flat: Vec<f32> = latents.concat();
        let x = Tensor::from_vec(flat, (n, CHANNELS, h, w), &self.device)
            .and_then(|x| x.to_dtype(self.dtype))
            .map_err(&vae)?;
        let x = (x / self.scaling_factor).map_err(&vae)?;
        let image = self
            .vae
            .decode(&x)
            .and_then(|i| i.to_dtype(DType::F32))
            .map_err(&vae)?;
        let image = ((image / 2.0).map_err(&vae)? + 0.5)
            .map_err(&vae)?
            .clamp(0f32, 1f32)
            .map_err(&vae)?;
        let all: Vec<f32> = image
            .flatten_all()
            .and_then(|i| i.to_vec1())
            .map_err(&vae)?;
        let per_image = all.len() / n.max(1);
        Ok(all.chunks(per_image.max(1)).map(<[f32]>::to_vec).collect())
    }
}
