//! `dx-label`: labels prompts for the noise level predictor. For each prompt and seed: the
//! kiosk's preview and its features, the gateway's refinement at each level of a grid, scored
//! against its refinement at level 1.0; writes the JSONL dataset and the projection its
//! features were made with, and prints a summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::{EngineConfig, Pipeline};
use diffusionx_label::clip::ClipScorer;
use diffusionx_label::cloud::CloudSettings;
use diffusionx_label::label::{
    LabelSettings, check_projection, label_request, projection_json, standard_projection,
};
use diffusionx_label::levels::{DEFAULT_LEVELS, parse_levels, plan_levels};
use diffusionx_label::preview::PreviewSettings;
use diffusionx_label::prompts::parse_prompts;
use diffusionx_label::run::{Failure, Job, Progress, label_jobs};
use diffusionx_label::score::Score;
use diffusionx_label::summary::{per_level, render};
use diffusionx_predictor::Projection;
use diffusionx_predictor_tools::output::print;
use diffusionx_refine::{Compute, Refiner};

/// A scheduler by its kiosk config name.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SchedulerArg {
    Ddim,
    Euler,
    Dpmpp2m,
    Lcm,
}

impl From<SchedulerArg> for SchedulerKind {
    fn from(arg: SchedulerArg) -> Self {
        match arg {
            SchedulerArg::Ddim => Self::Ddim,
            SchedulerArg::Euler => Self::Euler,
            SchedulerArg::Dpmpp2m => Self::DpmSolverPp2m,
            SchedulerArg::Lcm => Self::Lcm,
        }
    }
}

/// Which score becomes the label's quality.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScoreArg {
    /// clamp(SSIM, 0, 1).
    Ssim,
    /// clamp((PSNR - 10 dB) / 30 dB, 0, 1).
    Psnr,
    /// exp(-latent RMSE).
    Latent,
    /// clamp(CLIP score / 100, 0, 1): prompt fidelity by the --clip model.
    Clip,
}

impl From<ScoreArg> for Score {
    fn from(arg: ScoreArg) -> Self {
        match arg {
            ScoreArg::Ssim => Self::Ssim,
            ScoreArg::Psnr => Self::Psnr,
            ScoreArg::Latent => Self::Latent,
            ScoreArg::Clip => Self::Clip,
        }
    }
}

/// Labels prompts for the noise level predictor (see docs/predictor.md).
#[derive(Parser)]
struct Args {
    /// The prompt list: one prompt per line; blank lines and lines starting with # skipped.
    #[arg(long)]
    prompts: PathBuf,
    /// The dataset to write (JSONL, one line per prompt, seed and level).
    #[arg(long)]
    out: PathBuf,
    /// The kiosk's model folder (optimum ONNX layout with diffusionx.json).
    #[arg(long)]
    edge: PathBuf,
    /// The gateway's model folder (diffusers safetensors layout).
    #[arg(long)]
    cloud: PathBuf,
    /// Seeds; every prompt is labelled with each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// Image width in pixels (the kiosk's model.width).
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Image height in pixels (the kiosk's model.height).
    #[arg(long, default_value_t = 256)]
    height: usize,
    /// Preview steps (the kiosk's model.preview_steps).
    #[arg(long, default_value_t = 4)]
    steps: u16,
    /// Preview guidance (the kiosk's model.preview_guidance; at most 1: none).
    #[arg(long, default_value_t = 1.0)]
    guidance: f32,
    /// Preview scheduler (the kiosk's model.scheduler).
    #[arg(long, value_enum, default_value = "ddim")]
    scheduler: SchedulerArg,
    /// Steps N of the full cloud schedule (the kiosk's gateway.steps, default 20); a level s
    /// runs floor(N * s).
    #[arg(long, default_value_t = 20)]
    cloud_steps: u16,
    /// Cloud guidance (the kiosk's gateway.guidance).
    #[arg(long, default_value_t = 7.5)]
    cloud_guidance: f32,
    /// Cloud scheduler (the kiosk sends ddim).
    #[arg(long, value_enum, default_value = "ddim")]
    cloud_scheduler: SchedulerArg,
    /// Noise levels to label, each in (0, 1] in basis points, increasing.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_LEVELS)]
    levels: Vec<f32>,
    /// Which score becomes the quality (clip needs --clip).
    #[arg(long, value_enum, default_value = "ssim")]
    score: ScoreArg,
    /// A Hugging Face CLIPModel folder (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json): every line gets the CLIP score of its image against the prompt
    /// (`scores.clip`). Runs where the cloud model runs.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The text projection (JSON array of 8 rows); the standard one for the edge text
    /// encoder's width if absent.
    #[arg(long)]
    projection: Option<PathBuf>,
    /// Where to write the projection used (what `dx-train --projection` needs); default
    /// `<out>.projection.json`.
    #[arg(long)]
    projection_out: Option<PathBuf>,
    /// Threads of the edge engine's matrix products; all cores if absent.
    #[arg(long)]
    threads: Option<usize>,
    /// Run the cloud model on this CUDA GPU (needs the `cuda` feature) instead of the CPU.
    #[arg(long)]
    cuda: Option<usize>,
    /// Continue an interrupted run from `<out>.partial`: requests it finished are kept and
    /// not labelled again (the other flags must be the same as the first run's).
    #[arg(long)]
    resume: bool,
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over `path`, so a
/// reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_os_string();
    name.push(".tmp");
    let temporary = path.with_file_name(name);
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
}

fn read_projection(path: &Path) -> anyhow::Result<Projection> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Vec<f32>> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON array of rows", path.display()))?;
    Projection::new(rows).with_context(|| format!("--projection {}", path.display()))
}

/// Refuses missing model folders and a CLIP quality without a CLIP model, before any model
/// work.
fn check_models(args: &Args) -> anyhow::Result<()> {
    let clip = args.clip.iter().map(|dir| ("--clip", dir));
    for (flag, dir) in [("--edge", &args.edge), ("--cloud", &args.cloud)]
        .into_iter()
        .chain(clip)
    {
        if !dir.is_dir() {
            bail!("{flag} {}: no such model folder", dir.display());
        }
    }
    if matches!(args.score, ScoreArg::Clip) && args.clip.is_none() {
        bail!(
            "--score clip: the quality is the CLIP score, which needs a CLIP model: pass --clip DIR"
        );
    }
    Ok(())
}

/// The CLIP model of `--clip`, on the cloud model's device.
fn load_clip(args: &Args) -> anyhow::Result<Option<ClipScorer>> {
    let Some(dir) = &args.clip else {
        return Ok(None);
    };
    let device = match args.cuda {
        None => candle_core::Device::Cpu,
        Some(ordinal) => candle_core::Device::new_cuda(ordinal)
            .with_context(|| format!("--clip on CUDA device {ordinal}"))?,
    };
    let scorer = ClipScorer::load(dir, &device)
        .with_context(|| format!("loading the CLIP model --clip {}", dir.display()))?;
    Ok(Some(scorer))
}

fn load_models(args: &Args) -> anyhow::Result<(Pipeline, Refiner)> {
    let config = EngineConfig {
        threads: args.threads.unwrap_or(EngineConfig::default().threads),
        ..EngineConfig::default()
    };
    let pipeline = Pipeline::load(&args.edge, &config)
        .with_context(|| format!("loading the edge model --edge {}", args.edge.display()))?;
    let compute = args
        .cuda
        .map_or(Compute::Cpu, |ordinal| Compute::Cuda { ordinal });
    let refiner = Refiner::load_on(&args.cloud, compute)
        .with_context(|| format!("loading the cloud model --cloud {}", args.cloud.display()))?;
    Ok((pipeline, refiner))
}

/// The labelling settings the flags ask for.
fn settings(args: &Args, levels: Vec<NoiseLevel>) -> LabelSettings {
    LabelSettings {
        preview: PreviewSettings {
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance_scale: args.guidance,
            scheduler: args.scheduler.into(),
        },
        cloud: CloudSettings {
            steps: args.cloud_steps,
            guidance_scale: args.cloud_guidance,
            scheduler: args.cloud_scheduler.into(),
        },
        levels,
        score: args.score.into(),
    }
}

/// `--projection-out`, or `<out>.projection.json`.
fn projection_out(args: &Args) -> PathBuf {
    args.projection_out.clone().unwrap_or_else(|| {
        let mut name = args.out.as_os_str().to_os_string();
        name.push(".projection.json");
        PathBuf::from(name)
    })
}

/// A failed request in words: the prompt's position and text, the seed, the error.
fn describe(failure: &Failure) -> String {
    format!(
        "prompt {} ({:?}), seed {}: {}",
        failure.job.number, failure.job.prompt, failure.job.seed, failure.error
    )
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let args = Args::parse();
    let levels = parse_levels(&args.levels).context("--levels")?;
    let (levels, skipped) = plan_levels(&levels, args.cloud_steps).context("--levels")?;
    for level in &skipped {
        eprintln!(
            "warning: level {} runs 0 of the {} cloud steps; skipped",
            level.fraction(),
            args.cloud_steps
        );
    }
    if args.seeds.is_empty() {
        bail!("--seeds: no seed");
    }
    let text = std::fs::read_to_string(&args.prompts).with_context(|| {
        format!(
            "reading the prompt list --prompts {}",
            args.prompts.display()
        )
    })?;
    let prompts =
        parse_prompts(&text).with_context(|| format!("--prompts {}", args.prompts.display()))?;
    // Read before the models load, so a bad file fails fast.
    let given = args
        .projection
        .as_deref()
        .map(read_projection)
        .transpose()?;
    check_models(&args)?;
    let partial = Progress::partial_path(&args.out);
    if !args.resume && partial.exists() {
        bail!(
            "{} holds the labels of an interrupted run: pass --resume to continue it, or remove it",
            partial.display()
        );
    }
    let (pipeline, refiner) = load_models(&args)?;
    let clip = load_clip(&args)?;
    let projection = match (given, &args.projection) {
        (Some(projection), Some(path)) => {
            check_projection(&pipeline, &projection)
                .with_context(|| format!("--projection {}", path.display()))?;
            projection
        }
        _ => standard_projection(&pipeline)?,
    };
    let settings = settings(&args, levels);
    let projection_out = projection_out(&args);
    if args.resume && projection_out.exists() {
        let before = read_projection(&projection_out)?;
        if before != projection {
            bail!(
                "--resume: {} is not the projection of this run: the labels so far were made \
                 with another one",
                projection_out.display()
            );
        }
    }
    // Written first, so the labels of an interrupted run come with their projection.
    write_atomically(&projection_out, projection_json(&projection).as_bytes())?;
    let mut progress = Progress::start(&args.out, args.resume)?;
    let jobs: Vec<Job> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, prompt)| {
            args.seeds.iter().map(move |&seed| Job {
                number: i + 1,
                prompt: prompt.clone(),
                seed,
            })
        })
        .collect();
    let total = jobs.len();
    let resumed = progress.finished();
    if resumed > 0 {
        eprintln!(
            "resuming: {resumed} of {total} requests already labelled in {}",
            partial.display()
        );
    }
    let mut count = resumed;
    let failures = label_jobs(
        &jobs,
        &mut progress,
        |job| {
            let request = Instant::now();
            let labelled = label_request(
                &pipeline,
                &refiner,
                clip.as_ref(),
                &job.prompt,
                job.seed,
                &projection,
                &settings,
            )?;
            count += 1;
            eprintln!(
                "labelled {count}/{total}: {} seed {} ({:.1} s)",
                labelled.records[0].prompt_id,
                job.seed,
                request.elapsed().as_secs_f64()
            );
            Ok(labelled.records)
        },
        |failure| eprintln!("failed, skipped: {}", describe(failure)),
    )?;
    if progress.records().is_empty() {
        bail!(
            "every request failed; nothing was labelled ({} kept for --resume)",
            partial.display()
        );
    }
    let records = progress.finish(&args.out)?;
    let mut failed = String::new();
    if !failures.is_empty() {
        failed.push_str(&format!(
            "{} of {total} requests failed and have no labels:\n",
            failures.len()
        ));
        for failure in &failures {
            failed.push_str(&format!("  {}\n", describe(failure)));
        }
    }
    print(&format!(
        "{} prompts x {} seeds x {} levels: {} lines -> {}\nprojection -> {}\n{failed}{}time {:.1} s\n",
        prompts.len(),
        args.seeds.len(),
        settings.levels.len(),
        records.len(),
        args.out.display(),
        projection_out.display(),
        render(&per_level(&records)),
        started.elapsed().as_secs_f64()
    ))?;
    Ok(())
}
