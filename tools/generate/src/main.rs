//! `generate`: runs the kiosk's edge engine once, from the command line, and writes a PNG.
//!
//! Every knob of the engine is a flag; `--init-noise` and `--save-latents` exchange `.npy` files
//! with diffusers for side-by-side checks.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::{Decode, EngineConfig, Outcome, Pipeline, Request, RgbImage, Start, npy};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sampler {
    Ddim,
    Euler,
    Dpmpp2m,
    Lcm,
}

impl From<Sampler> for SchedulerKind {
    fn from(s: Sampler) -> Self {
        match s {
            Sampler::Ddim => Self::Ddim,
            Sampler::Euler => Self::Euler,
            Sampler::Dpmpp2m => Self::DpmSolverPp2m,
            Sampler::Lcm => Self::Lcm,
        }
    }
}

/// Which decoder makes the image, and the previews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Decoder {
    /// The model's VAE decoder.
    Vae,
    /// The folder's tiny VAE decoder (`tiny_vae_decoder/`); previews at full size.
    Tiny,
}

/// The img2img noise level when `--init-latent` is given without `--strength`.
const DEFAULT_STRENGTH: f32 = 0.5;

/// Generate one image with the edge (Tiny-SD, tract) engine.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Model folder (optimum ONNX layout + diffusionx.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Seed of every noise drawn (see docs/protocol.md section 8).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (multiple of 64, 256..=1024).
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 256)]
    height: usize,
    /// Steps of the schedule.
    #[arg(long, default_value_t = 4)]
    steps: u16,
    /// Classifier-free guidance scale; 1 or less disables guidance.
    #[arg(long, default_value_t = 1.0)]
    guidance: f32,
    /// Scheduler.
    #[arg(long, value_enum, default_value_t = Sampler::Euler)]
    scheduler: Sampler,
    /// Start from this latent (`.npy`, f32 [1,4,h/8,w/8], scaled) instead of noise (img2img).
    #[arg(long)]
    init_latent: Option<PathBuf>,
    /// img2img noise level in (0, 1] [default: 0.5]; only with `--init-latent` (a
    /// text-to-image run starts from pure noise, so a strength would mean nothing).
    #[arg(long, requires = "init_latent")]
    strength: Option<f32>,
    /// Use this noise (`.npy`, f32 [1,4,h/8,w/8]) instead of drawing it from the seed.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Write the final latent here (`.npy`, f32 [1,4,h/8,w/8], scaled).
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Write each step's live preview here as `step-K.png`.
    #[arg(long)]
    previews: Option<PathBuf>,
    /// The decoder of the image; with `tiny` the previews go through it too (full size
    /// instead of the linear latent-to-RGB map at 1/8 size).
    #[arg(long, value_enum, default_value_t = Decoder::Vae)]
    decoder: Decoder,
    /// Output PNG.
    #[arg(long, default_value = "generated.png")]
    out: PathBuf,
    /// Threads for tract's matrix products (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Whose kernels run the matrix products: `packed`, `int8` (as packed, and an int8 model's
    /// weights multiplied in 8-bit integer arithmetic), `gemm` or `tract` (default: the
    /// engine's for this CPU).
    #[arg(long, value_parser = |s: &str| s.parse::<diffusionx_engine::Products>())]
    products: Option<diffusionx_engine::Products>,
    /// Skip the SHA-256 check of the model files.
    #[arg(long)]
    no_verify: bool,
}

/// Reads a latent-shaped `.npy`, `[1, 4, height / 8, width / 8]` (what diffusers and
/// `--save-latents` write), refusing any other shape: the engine checks only the number of
/// values, so a latent of the transposed size (512x256 for a 256x512 run) would otherwise run
/// as a scrambled image.
fn read_latent(path: &Path, width: usize, height: usize) -> Result<Vec<f32>> {
    let array = npy::read::<f32>(path).with_context(|| format!("reading {}", path.display()))?;
    let expected = [1, 4, height / 8, width / 8];
    if array.shape != expected {
        bail!(
            "{}: shape {:?}, a {width}x{height} image needs {expected:?}",
            path.display(),
            array.shape
        );
    }
    Ok(array.data)
}

fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    let buffer = image::RgbImage::from_raw(
        image.width as u32,
        image.height as u32,
        image.pixels.clone(),
    )
    .context("image buffer size")?;
    buffer
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = EngineConfig {
        verify_hashes: !args.no_verify,
        ..EngineConfig::default()
    };
    if let Some(threads) = args.threads {
        config.threads = threads;
    }
    if let Some(products) = args.products {
        config.products = products;
    }
    let started = Instant::now();
    let pipeline = Pipeline::load(&args.model, &config)?;
    eprintln!(
        "loaded {} in {:.1?}",
        args.model.display(),
        started.elapsed()
    );

    let read = |path: &Path| read_latent(path, args.width, args.height);
    let noise = args.init_noise.as_deref().map(read).transpose()?;
    let start = match &args.init_latent {
        Some(path) => {
            let strength = args.strength.unwrap_or(DEFAULT_STRENGTH);
            Start::Latent {
                latent: read(path)?,
                noise_level: NoiseLevel::from_fraction(strength)
                    .with_context(|| format!("strength {strength} is not in (0, 1]"))?,
                noise,
            }
        }
        None => Start::Noise(noise),
    };
    let request = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed: args.seed,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler: args.scheduler.into(),
        start,
        step_noise: None,
        decode: match args.decoder {
            Decoder::Vae => Decode::Vae,
            Decoder::Tiny => Decode::Tiny,
        },
    };
    if let Some(dir) = &args.previews {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut preview_error = None;
    let outcome = pipeline.generate(&request, &mut |p| {
        eprintln!("step {}/{}", p.step, p.total);
        if let Some(dir) = &args.previews {
            let saved = match args.decoder {
                Decoder::Vae => Ok(p.preview()),
                Decoder::Tiny => p
                    .tiny_preview()
                    .map_err(anyhow::Error::from)
                    .and_then(|image| image.context("the folder has no tiny VAE decoder")),
            }
            .and_then(|image| save_png(&image, &dir.join(format!("step-{}.png", p.step))));
            if let Err(e) = saved {
                preview_error = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(error) = preview_error {
        return Err(error);
    }
    let Outcome::Finished(generation) = outcome else {
        bail!("the run was cancelled")
    };
    let [c, h, w] = generation.latent_shape;
    if let Some(path) = &args.save_latents {
        npy::write(path, &[1, c, h, w], &generation.latent)?;
    }
    let image = generation.image.context("the engine decodes when asked")?;
    save_png(&image, &args.out)?;
    let t = generation.timings;
    eprintln!(
        "wrote {} ({}x{}): text {:.2?}, {} steps {:.2?}, decode {:.2?}",
        args.out.display(),
        image.width,
        image.height,
        t.text,
        generation.steps_run,
        t.denoise,
        t.decode
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

    use super::*;

    /// A file in a fresh folder of the system's temporary directory.
    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dx-generate-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn strength_without_an_init_latent_is_a_usage_error() {
        let error = Args::try_parse_from([
            "generate",
            "--model",
            "m",
            "--prompt",
            "fox",
            "--strength",
            "0.3",
        ])
        .unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let message = error.to_string();
        assert!(message.contains("--init-latent <INIT_LATENT>"), "{message}");
        assert!(message.contains("--strength <STRENGTH>"), "{message}");
        // With an init latent it is taken; without either, text-to-image has none.
        let img2img = Args::try_parse_from([
            "generate",
            "--model",
            "m",
            "--prompt",
            "fox",
            "--init-latent",
            "l.npy",
            "--strength",
            "0.3",
        ])
        .unwrap();
        assert_eq!(img2img.strength, Some(0.3));
        let text = Args::try_parse_from(["generate", "--model", "m", "--prompt", "fox"]).unwrap();
        assert_eq!(text.strength, None);
    }

    #[test]
    fn a_latent_of_the_run_size_is_read() {
        let path = temp_file("ok.npy");
        let values: Vec<f32> = (0..4 * 64 * 32).map(|i| i as f32).collect();
        npy::write(&path, &[1, 4, 64, 32], &values).unwrap();
        assert_eq!(read_latent(&path, 256, 512).unwrap(), values);
    }

    #[test]
    fn a_transposed_latent_is_refused_naming_the_file() {
        let path = temp_file("transposed.npy");
        npy::write(&path, &[1, 4, 32, 64], &vec![0.0f32; 4 * 32 * 64]).unwrap();
        let error = read_latent(&path, 256, 512).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "{}: shape [1, 4, 32, 64], a 256x512 image needs [1, 4, 64, 32]",
                path.display()
            )
        );
    }
}
