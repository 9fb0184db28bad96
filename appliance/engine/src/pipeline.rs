//! The Tiny-SD pipeline: prompt -> text embeddings -> denoising loop -> latent -> image.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diffusionx_diffusion::{
    Denoised, NoiseLevel, STREAM_INITIAL, STREAM_RENOISE, Scheduler, SchedulerConfig,
    SchedulerKind, denoise, gaussian_noise, guide, lcm_step_stream,
};
use tract_onnx::prelude::*;

use crate::cache::TextCache;
use crate::error::EngineError;
use crate::folder::{ModelFolder, TINY_VAE_DECODER};
use crate::graph::{Graph, Products};
use crate::preview::{RgbImage, decoded_to_rgb, latent_to_rgb};
use diffusionx_text::{CONTEXT, ClipTokenizer};

/// Latent channels of the SD-1.x VAE.
const CHANNELS: usize = 4;
/// Image pixels per latent cell.
const VAE_SCALE: usize = 8;

/// How the engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Threads for tract's matrix products; 1 runs everything on the calling thread.
    pub threads: usize,
    /// Check every file's SHA-256 against the manifest when loading.
    pub verify_hashes: bool,
    /// Prompts whose embeddings are kept between rounds.
    pub text_cache_entries: usize,
    /// Whose kernels run the graphs' f32 matrix products.
    pub products: Products,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            verify_hashes: true,
            text_cache_entries: 8,
            products: Products::default(),
        }
    }
}

/// Sets how many threads tract's matrix products use. tract's executor is process-wide, so the
/// last call wins; 1 (or 0) runs them on the calling thread.
pub fn set_threads(threads: usize) {
    let executor = match threads {
        0 | 1 => tract_linalg::multithread::Executor::SingleThread,
        n => tract_linalg::multithread::Executor::multithread(n),
    };
    tract_linalg::multithread::set_default_executor(executor);
}

/// Where the denoising starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Text to image from Gaussian noise: drawn from the seed unless given (`[4, h/8, w/8]`).
    Noise(Option<Vec<f32>>),
    /// img2img from a latent (scaled, `[4, h/8, w/8]`) re-noised to `noise_level`; the noise
    /// is drawn from the seed unless given.
    Latent {
        /// The clean latent to start from.
        latent: Vec<f32>,
        /// How much of it to redo.
        noise_level: NoiseLevel,
        /// The re-noising noise, if not from the seed.
        noise: Option<Vec<f32>>,
    },
}

/// One generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty for none).
    pub negative_prompt: String,
    /// Seed of every noise the run draws.
    pub seed: u64,
    /// Image width in pixels, a multiple of 64 in 256..=768 on the kiosk.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Steps of the full schedule (img2img runs the last part of it).
    pub steps: u16,
    /// Classifier-free guidance scale, finite; at most 1 disables guidance (one UNet batch, no
    /// negative prompt).
    pub guidance_scale: f32,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// Where to start.
    pub start: Start,
    /// Per-step noise for schedulers that draw it (LCM), instead of drawing it from the seed.
    pub step_noise: Option<Vec<Vec<f32>>>,
    /// Which decoder makes the final image, if any.
    pub decode: Decode,
}

/// Which decoder turns a run's final latent into its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// No image: the latent is the result (a preview the cloud will refine, a benchmark).
    Skip,
    /// The model's VAE decoder: the model's own picture.
    Vae,
    /// The folder's tiny VAE decoder ([`TINY_VAE_DECODER`]): close to the VAE's picture at a
    /// small fraction of its cost, for previews. A request for it fails if the folder has none
    /// ([`Pipeline::has_tiny_vae_decoder`]).
    Tiny,
}

/// Reported after every denoising step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Steps done, 1..=total.
    pub step: usize,
    /// Steps this run takes.
    pub total: usize,
    /// The scheduler's prediction of the clean latent after this step (`[4, h/8, w/8]`).
    pub denoised: &'a [f32],
    /// The sample after this step (what the next step denoises), `[4, h/8, w/8]`.
    pub sample: &'a [f32],
    latent_height: usize,
    latent_width: usize,
    tiny_vae_decoder: Option<&'a Graph>,
}

impl Progress<'_> {
    /// A cheap RGB preview of the predicted clean latent, at 1/8 of the image size.
    pub fn preview(&self) -> RgbImage {
        latent_to_rgb(self.denoised, self.latent_height, self.latent_width)
    }

    /// The predicted clean latent through the folder's tiny VAE decoder, at the image's full
    /// size: a truer preview than [`preview`](Self::preview), for one tiny-decoder call.
    /// `None` if the folder has no tiny decoder.
    pub fn tiny_preview(&self) -> Result<Option<RgbImage>, EngineError> {
        let Some(graph) = self.tiny_vae_decoder else {
            return Ok(None);
        };
        let (h, w) = (self.latent_height, self.latent_width);
        let pixels = run_decoder(graph, self.denoised, h, w)?;
        Ok(Some(decoded_to_rgb(&pixels, h * VAE_SCALE, w * VAE_SCALE)))
    }
}

/// Where a run's time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Tokenizing and text encoding (zero when cached).
    pub text: Duration,
    /// All denoising steps.
    pub denoise: Duration,
    /// The decode (VAE or tiny decoder; zero when skipped).
    pub decode: Duration,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The final latent, scaled (what the gateway takes), `[4, h/8, w/8]`.
    pub latent: Vec<f32>,
    /// `[channels, height, width]` of the latent.
    pub latent_shape: [usize; 3],
    /// The decoded image, when the request asked for it.
    pub image: Option<RgbImage>,
    /// The decoded image as the decoder gave it, `(x / 2 + 0.5)` clamped to [0, 1], `[3, H, W]`.
    pub image_f32: Option<Vec<f32>>,
    /// Denoising steps run.
    pub steps_run: usize,
    /// Where the time went.
    pub timings: Timings,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The run finished.
    Finished(Generation),
    /// The progress callback asked to stop after `after_step` steps.
    Cancelled {
        /// Steps finished before stopping.
        after_step: usize,
    },
}

/// A prompt as the noise level predictor sees it ([`Pipeline::prompt_facts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptFacts {
    /// Length in CLIP tokens, start and end token included (at most 77).
    pub tokens: u32,
    /// The pooled text embedding (`hidden` values).
    pub pooled: Vec<f32>,
}

/// A loaded Tiny-SD pipeline.
pub struct Pipeline {
    folder: ModelFolder,
    tokenizer: ClipTokenizer,
    text_encoder: Graph,
    unet: Graph,
    vae_decoder: Graph,
    tiny_vae_decoder: Option<Graph>,
    scheduler_config: SchedulerConfig,
    text_cache: Mutex<TextCache>,
    /// `(height, width)` sizes outside the manifest's checked resolutions that
    /// [`Pipeline::generate`] has already warned about (once each).
    unchecked_warned: Mutex<BTreeSet<(usize, usize)>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("folder", &self.folder.root())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Opens and checks the model folder at `root`, parses its graphs and sets tract's threads.
    pub fn load(root: &Path, config: &EngineConfig) -> Result<Self, EngineError> {
        let folder = ModelFolder::open(root, config.verify_hashes)?;
        set_threads(config.threads);
        let load = |name, path: &Path| {
            Graph::load(name, path).map(|graph| graph.with_products(config.products))
        };
        let scheduler_path = folder.path("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&scheduler_path)
            .map_err(|e| EngineError::io(&scheduler_path, e))?;
        let scheduler_config =
            SchedulerConfig::from_json(&text).map_err(|e| EngineError::Config {
                path: scheduler_path,
                reason: e.to_string(),
            })?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_folder(&folder.path("tokenizer"))?,
            text_encoder: load("text_encoder", &folder.path("text_encoder/model.onnx"))?,
            unet: load("unet", &folder.path("unet/model.onnx"))?,
            vae_decoder: load("vae_decoder", &folder.path("vae_decoder/model.onnx"))?,
            tiny_vae_decoder: folder
                .tiny_vae_decoder()
                .map(|path| load("tiny_vae_decoder", &path))
                .transpose()?,
            scheduler_config,
            text_cache: Mutex::new(TextCache::new(config.text_cache_entries)),
            unchecked_warned: Mutex::new(BTreeSet::new()),
            folder,
        })
    }

    /// The model folder.
    pub fn folder(&self) -> &ModelFolder {
        &self.folder
    }

    /// Whether the folder has the tiny VAE decoder ([`Decode::Tiny`], [`Progress::tiny_preview`]).
    pub fn has_tiny_vae_decoder(&self) -> bool {
        self.tiny_vae_decoder.is_some()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The folder's scheduler configuration.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Forgets the cached prompt embeddings (at the end of a visitor session).
    pub fn clear_text_cache(&self) {
        self.text_cache.lock().expect("cache lock").clear();
    }

    /// Prompts whose embeddings are cached.
    pub fn cached_prompts(&self) -> usize {
        self.text_cache.lock().expect("cache lock").len()
    }

    /// Builds every plan a `width` x `height` run at `guidance_scale` needs (text encoder, the
    /// UNet at batch 2 with guidance or batch 1 without, VAE decoder and the tiny decoder when
    /// the folder has one), so the first visitor does
    /// not wait for tract's optimizer. Each UNet plan holds its own packed weights, so only the
    /// batch the kiosk uses is built; another one is built on first use.
    ///
    /// This is the kiosk's start-up path, so it refuses a size the export did not verify: one
    /// outside the manifest's `checked_resolutions` when that list is not empty
    /// ([`ModelFolder::checked`]), and a guidance scale that is not finite.
    pub fn prepare(
        &self,
        width: usize,
        height: usize,
        guidance_scale: f32,
    ) -> Result<(), EngineError> {
        let (h, w) = latent_size(width, height)?;
        check_guidance(guidance_scale)?;
        if !self.folder.checked(height, width) {
            return Err(EngineError::InvalidRequest(format!(
                "{width}x{height} px is not among the model folder's checked resolutions \
                 ({}; [height, width] pairs in {})",
                self.checked_list(),
                crate::folder::MANIFEST
            )));
        }
        // Encoding the empty prompt builds the text encoder's plan (and caches the embedding
        // every guidance-free negative prompt uses).
        let hidden = self.encode_text("")?.len() / CONTEXT;
        let batch = if guidance_scale > 1.0 { 2 } else { 1 };
        self.unet.prepare(self.unet_inputs(
            &vec![0.0; batch * CHANNELS * h * w],
            batch,
            (h, w),
            1.0,
            &vec![0.0; batch * CONTEXT * hidden],
        )?)?;
        let latent = Tensor::from_shape(&[1, CHANNELS, h, w], &vec![0.0f32; CHANNELS * h * w])
            .map_err(|e| EngineError::tract("vae_decoder", "input", e))?;
        if let Some(tiny) = &self.tiny_vae_decoder {
            tiny.prepare(vec![("latent_sample", latent.clone())])?;
        }
        self.vae_decoder.prepare(vec![("latent_sample", latent)])
    }

    /// The text encoder's last hidden state for `text`, `[77, hidden]`, cached per session.
    pub fn encode_text(&self, text: &str) -> Result<Arc<Vec<f32>>, EngineError> {
        if let Some(hit) = self.text_cache.lock().expect("cache lock").get(text) {
            return Ok(hit);
        }
        let ids = self.tokenizer.encode(text)?;
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let (shape, data) = self.text_encoder.run(
            vec![("input_ids", self.ids_tensor(&ids)?)],
            "last_hidden_state",
        )?;
        if shape.len() != 3 || shape[1] != CONTEXT {
            return Err(EngineError::Graph {
                graph: "text_encoder",
                reason: format!("last_hidden_state has shape {shape:?}, expected [1, 77, hidden]"),
            });
        }
        let embedding = Arc::new(data);
        self.text_cache
            .lock()
            .expect("cache lock")
            .insert(text, embedding.clone());
        Ok(embedding)
    }

    /// What the noise level predictor needs to know about `text`: its length in CLIP tokens
    /// (start and end token included, at most 77) and its pooled embedding, the text
    /// encoder's last hidden state at the first end token of the encoded ids (what CLIP's
    /// `pooler_output` is: a prompt that holds the literal `<|endoftext|>` is pooled there, not
    /// at the end of the prompt), from the same cached encoding the denoising uses.
    pub fn prompt_facts(&self, text: &str) -> Result<PromptFacts, EngineError> {
        let tokens = self.tokenizer.count(text)?.min(CONTEXT);
        let eos = self.tokenizer.eos();
        let end = self
            .tokenizer
            .encode(text)?
            .iter()
            .position(|&id| id == eos)
            .expect("encode always writes an end token");
        let hidden_states = self.encode_text(text)?;
        let hidden = hidden_states.len() / CONTEXT;
        Ok(PromptFacts {
            tokens: u32::try_from(tokens).expect("at most 77 tokens"),
            pooled: hidden_states[end * hidden..(end + 1) * hidden].to_vec(),
        })
    }

    fn ids_tensor(&self, ids: &[i64]) -> Result<Tensor, EngineError> {
        let err = |e| EngineError::tract("text_encoder", "input_ids", e);
        match self.text_encoder.input_type("input_ids")? {
            DatumType::I32 => {
                let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
                Tensor::from_shape(&[1, ids.len()], &ids).map_err(err)
            }
            _ => Tensor::from_shape(&[1, ids.len()], ids).map_err(err),
        }
    }

    fn unet_inputs(
        &self,
        sample: &[f32],
        batch: usize,
        (h, w): (usize, usize),
        timestep: f32,
        embeddings: &[f32],
    ) -> Result<Vec<(&'static str, Tensor)>, EngineError> {
        let err = |e| EngineError::tract("unet", "inputs", e);
        let hidden = embeddings.len() / (batch * CONTEXT);
        let sample = Tensor::from_shape(&[batch, CHANNELS, h, w], sample).map_err(err)?;
        let embeddings = Tensor::from_shape(&[batch, CONTEXT, hidden], embeddings).map_err(err)?;
        // optimum exports the timestep as a scalar; other exporters as a [batch] vector.
        let shape: &[usize] = if self.unet.input_rank("timestep") == Some(0) {
            &[]
        } else {
            &[batch]
        };
        let count = shape.iter().product::<usize>();
        let timestep = match self.unet.input_type("timestep")? {
            DatumType::I64 => Tensor::from_shape(shape, &vec![timestep.round() as i64; count]),
            DatumType::I32 => Tensor::from_shape(shape, &vec![timestep.round() as i32; count]),
            _ => Tensor::from_shape(shape, &vec![timestep; count]),
        }
        .map_err(err)?;
        Ok(vec![
            ("sample", sample),
            ("timestep", timestep),
            ("encoder_hidden_states", embeddings),
        ])
    }

    /// One UNet call: the noise prediction for `batch` samples of `[4, h, w]` at `timestep`,
    /// with `embeddings` of `[batch, 77, hidden]`.
    pub fn predict_noise(
        &self,
        sample: &[f32],
        batch: usize,
        (h, w): (usize, usize),
        timestep: f32,
        embeddings: &[f32],
    ) -> Result<Vec<f32>, EngineError> {
        let inputs = self.unet_inputs(sample, batch, (h, w), timestep, embeddings)?;
        let (shape, noise) = self.unet.run(inputs, "out_sample")?;
        // A UNet exported wrongly (other `out_channels`, another layout) must fail here with
        // its name, not in the scheduler's arithmetic.
        check_noise(&shape, batch, h, w)?;
        Ok(noise)
    }

    /// Runs `request`, calling `progress` after every step; the callback stops the run by
    /// returning `ControlFlow::Break`.
    pub fn generate(
        &self,
        request: &Request,
        progress: &mut dyn FnMut(&Progress<'_>) -> ControlFlow<()>,
    ) -> Result<Outcome, EngineError> {
        let (h, w) = latent_size(request.width, request.height)?;
        let len = CHANNELS * h * w;
        check_finite_request(request)?;
        self.warn_if_unchecked(request.width, request.height);
        let guided = request.guidance_scale > 1.0;
        if request.decode == Decode::Tiny {
            // Refused before any step is spent on a run whose image cannot be made.
            self.tiny_decoder()?;
        }

        let started = Instant::now();
        let cond = self.encode_text(&request.prompt)?;
        let embeddings: Vec<f32> = if guided {
            let uncond = self.encode_text(&request.negative_prompt)?;
            uncond.iter().chain(cond.iter()).copied().collect()
        } else {
            cond.to_vec()
        };
        let text_time = started.elapsed();

        let started = Instant::now();
        let (mut scheduler, mut sample) = self.start(request, len)?;
        let batch = if guided { 2 } else { 1 };
        let steps_run = scheduler.timesteps().len();
        let predict = |scaled: &[f32], t: f32| -> Result<Vec<f32>, EngineError> {
            if !guided {
                return self.predict_noise(scaled, 1, (h, w), t, &embeddings);
            }
            let out =
                self.predict_noise(&[scaled, scaled].concat(), batch, (h, w), t, &embeddings)?;
            let (uncond, cond) = out.split_at(len);
            Ok(guide(uncond, cond, request.guidance_scale))
        };
        let ended = denoise(
            &mut scheduler,
            &mut sample,
            predict,
            |step| self.step_noise(request, step, len),
            |report| {
                progress(&Progress {
                    step: report.step,
                    total: report.total,
                    denoised: report.denoised,
                    sample: report.sample,
                    latent_height: h,
                    latent_width: w,
                    tiny_vae_decoder: self.tiny_vae_decoder.as_ref(),
                })
            },
        )?;
        if let Denoised::Cancelled { after_step } = ended {
            return Ok(Outcome::Cancelled { after_step });
        }
        let denoise_time = started.elapsed();

        let started = Instant::now();
        let pixels = match request.decode {
            Decode::Skip => None,
            Decode::Vae => Some(self.decode(&sample, h, w)?),
            Decode::Tiny => Some(self.decode_tiny(&sample, h, w)?),
        };
        let (image, image_f32) = if let Some(pixels) = pixels {
            (
                Some(decoded_to_rgb(&pixels, h * VAE_SCALE, w * VAE_SCALE)),
                Some(
                    pixels
                        .iter()
                        .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
                        .collect(),
                ),
            )
        } else {
            (None, None)
        };
        Ok(Outcome::Finished(Generation {
            latent: sample,
            latent_shape: [CHANNELS, h, w],
            image,
            image_f32,
            steps_run,
            timings: Timings {
                text: text_time,
                denoise: denoise_time,
                decode: started.elapsed(),
            },
        }))
    }

    /// The scheduler for `request` and the first sample to denoise.
    fn start(&self, request: &Request, len: usize) -> Result<(Scheduler, Vec<f32>), EngineError> {
        let noise = |given: &Option<Vec<f32>>, stream: u64| -> Result<Vec<f32>, EngineError> {
            match given {
                Some(noise) if noise.len() == len => Ok(noise.clone()),
                Some(noise) => Err(EngineError::InvalidRequest(format!(
                    "noise has {} values, the latent needs {len}",
                    noise.len()
                ))),
                None => {
                    let mut noise = vec![0.0; len];
                    gaussian_noise(request.seed, stream, &mut noise);
                    Ok(noise)
                }
            }
        };
        match &request.start {
            Start::Noise(given) => {
                let scheduler = Scheduler::new(
                    request.scheduler,
                    &self.scheduler_config,
                    usize::from(request.steps),
                )
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
                let sigma = scheduler.init_noise_sigma();
                let sample = noise(given, STREAM_INITIAL)?
                    .iter()
                    .map(|x| x * sigma)
                    .collect();
                Ok((scheduler, sample))
            }
            Start::Latent {
                latent,
                noise_level,
                noise: given,
            } => {
                if latent.len() != len {
                    return Err(EngineError::InvalidRequest(format!(
                        "latent has {} values, {}x{} needs {len}",
                        latent.len(),
                        request.width,
                        request.height
                    )));
                }
                let scheduler = Scheduler::for_img2img(
                    request.scheduler,
                    &self.scheduler_config,
                    usize::from(request.steps),
                    *noise_level,
                )
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
                let mut sample = vec![0.0; len];
                scheduler.add_noise(latent, &noise(given, STREAM_RENOISE)?, &mut sample);
                Ok((scheduler, sample))
            }
        }
    }

    /// The fresh noise a scheduler draws at `step` (LCM): the request's, or from the seed.
    fn step_noise(
        &self,
        request: &Request,
        step: usize,
        len: usize,
    ) -> Result<Vec<f32>, EngineError> {
        if let Some(given) = &request.step_noise {
            return match given.get(step) {
                Some(noise) if noise.len() == len => Ok(noise.clone()),
                _ => Err(EngineError::InvalidRequest(format!(
                    "no step noise of {len} values for step {step}"
                ))),
            };
        }
        let mut noise = vec![0.0; len];
        gaussian_noise(request.seed, lcm_step_stream(step), &mut noise);
        Ok(noise)
    }

    /// The manifest's checked resolutions as `[h, w]` pairs, for messages.
    fn checked_list(&self) -> String {
        let list: Vec<String> = self
            .folder
            .manifest()
            .checked_resolutions
            .iter()
            .map(|[h, w]| format!("[{h}, {w}]"))
            .collect();
        list.join(", ")
    }

    /// [`generate`](Self::generate) runs sizes the export did not check (tools, benchmarks),
    /// but says so, once per size: a graph with static spatial axes fails there only inside
    /// tract's optimizer.
    fn warn_if_unchecked(&self, width: usize, height: usize) {
        if self.folder.checked(height, width) {
            return;
        }
        let first = self
            .unchecked_warned
            .lock()
            .expect("warned lock")
            .insert((height, width));
        if first {
            tracing::warn!(
                folder = %self.folder.root().display(),
                checked = %self.checked_list(),
                "{width}x{height} px is not among the model folder's checked resolutions"
            );
        }
    }

    /// VAE-decodes a scaled latent to `[3, H, W]` in [-1, 1].
    pub fn decode(&self, latent: &[f32], h: usize, w: usize) -> Result<Vec<f32>, EngineError> {
        let scale = self.folder.manifest().vae_scaling_factor;
        let unscaled: Vec<f32> = latent.iter().map(|x| x / scale).collect();
        let tensor = Tensor::from_shape(&[1, CHANNELS, h, w], &unscaled)
            .map_err(|e| EngineError::tract("vae_decoder", "input", e))?;
        let (shape, pixels) = self
            .vae_decoder
            .run(vec![("latent_sample", tensor)], "sample")?;
        check_decoded("vae_decoder", &shape, h, w)?;
        Ok(pixels)
    }

    /// Decodes a scaled latent (`[4, h, w]`, as the UNet sees it) with the folder's tiny VAE
    /// decoder to `[3, 8h, 8w]`, about [-1, 1]; an error if the folder has none.
    pub fn decode_tiny(&self, latent: &[f32], h: usize, w: usize) -> Result<Vec<f32>, EngineError> {
        run_decoder(self.tiny_decoder()?, latent, h, w)
    }

    fn tiny_decoder(&self) -> Result<&Graph, EngineError> {
        self.tiny_vae_decoder.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "the model folder {} has no tiny VAE decoder ({TINY_VAE_DECODER})",
                self.folder.root().display()
            ))
        })
    }
}

/// Runs a decoder graph taking the scaled latent as is (the tiny decoder) on `[4, h, w]`.
fn run_decoder(graph: &Graph, latent: &[f32], h: usize, w: usize) -> Result<Vec<f32>, EngineError> {
    let tensor = Tensor::from_shape(&[1, CHANNELS, h, w], latent)
        .map_err(|e| EngineError::tract(graph.name(), "input", e))?;
    let (shape, pixels) = graph.run(vec![("latent_sample", tensor)], "sample")?;
    check_decoded(graph.name(), &shape, h, w)?;
    Ok(pixels)
}

/// A decoder's output must be one `[3, 8h, 8w]` image.
fn check_decoded(
    graph: &'static str,
    shape: &[usize],
    h: usize,
    w: usize,
) -> Result<(), EngineError> {
    if shape != [1, 3, h * VAE_SCALE, w * VAE_SCALE] {
        return Err(EngineError::Graph {
            graph,
            reason: format!(
                "sample has shape {shape:?}, expected [1, 3, {}, {}]",
                h * VAE_SCALE,
                w * VAE_SCALE
            ),
        });
    }
    Ok(())
}

/// The UNet's `out_sample` must have the latent's shape, one per batch row.
fn check_noise(shape: &[usize], batch: usize, h: usize, w: usize) -> Result<(), EngineError> {
    if shape != [batch, CHANNELS, h, w] {
        return Err(EngineError::Graph {
            graph: "unet",
            reason: format!(
                "out_sample has shape {shape:?}, expected [{batch}, {CHANNELS}, {h}, {w}]"
            ),
        });
    }
    Ok(())
}

/// A guidance scale must be a number: NaN would turn guidance off (`NaN > 1` is false, so the
/// negative prompt is ignored) and an infinity makes every latent value NaN.
fn check_guidance(scale: f32) -> Result<(), EngineError> {
    if !scale.is_finite() {
        return Err(EngineError::InvalidRequest(format!(
            "guidance_scale is {scale}, expected a finite number"
        )));
    }
    Ok(())
}

/// Refuses a request with a non-finite guidance scale, or a non-finite value in any latent or
/// noise it gives: such a value goes through every step and decodes to a grey or black picture.
/// One pass over the given data.
fn check_finite_request(request: &Request) -> Result<(), EngineError> {
    check_guidance(request.guidance_scale)?;
    match &request.start {
        Start::Noise(noise) => check_finite_opt("start noise", noise.as_deref())?,
        Start::Latent { latent, noise, .. } => {
            check_finite("start latent", latent)?;
            check_finite_opt("start noise", noise.as_deref())?;
        }
    }
    for (step, noise) in request.step_noise.iter().flatten().enumerate() {
        check_finite(&format!("step_noise[{step}]"), noise)?;
    }
    Ok(())
}

fn check_finite_opt(field: &str, values: Option<&[f32]>) -> Result<(), EngineError> {
    values.map_or(Ok(()), |values| check_finite(field, values))
}

/// `field` must hold only finite values.
fn check_finite(field: &str, values: &[f32]) -> Result<(), EngineError> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(at) => Err(EngineError::InvalidRequest(format!(
            "{field} holds a non-finite value ({} at index {at})",
            values[at]
        ))),
        None => Ok(()),
    }
}

/// Latent `(height, width)` of an image, refusing sizes the UNet cannot take.
fn latent_size(width: usize, height: usize) -> Result<(usize, usize), EngineError> {
    let ok = |px: usize| px.is_multiple_of(64) && (256..=1024).contains(&px);
    if !ok(width) || !ok(height) {
        return Err(EngineError::InvalidRequest(format!(
            "{width}x{height} px: each side must be a multiple of 64 in 256..=1024"
        )));
    }
    Ok((height / VAE_SCALE, width / VAE_SCALE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_named_with_their_field_and_index() {
        assert!(check_finite("start latent", &[0.0, -1.5, 3.0]).is_ok());
        let err = check_finite("start latent", &[0.0, f32::INFINITY, f32::NAN])
            .expect_err("inf is not finite")
            .to_string();
        assert_eq!(
            err,
            "invalid request: start latent holds a non-finite value (inf at index 1)"
        );
        let err = check_guidance(f32::NEG_INFINITY)
            .expect_err("-inf is not finite")
            .to_string();
        assert_eq!(
            err,
            "invalid request: guidance_scale is -inf, expected a finite number"
        );
    }

    #[test]
    fn a_unet_output_of_another_shape_is_a_graph_error() {
        assert!(check_noise(&[2, 4, 32, 32], 2, 32, 32).is_ok());
        let error = check_noise(&[2, 8, 32, 32], 2, 32, 32)
            .expect_err("8 channels are not a latent")
            .to_string();
        assert!(
            error.contains("out_sample has shape [2, 8, 32, 32], expected [2, 4, 32, 32]"),
            "{error}"
        );
        assert!(
            check_noise(&[1, 4, 32, 32], 2, 32, 32).is_err(),
            "one row for two"
        );
    }
}
