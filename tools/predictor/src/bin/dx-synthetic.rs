//! `dx-synthetic`: writes a synthetic labelled dataset drawn from the known quality function
//! of `diffusionx_predictor_tools::synthetic`, and the projection its text features used.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use diffusionx_predictor_tools::dataset::to_jsonl;
use diffusionx_predictor_tools::output::print;
use diffusionx_predictor_tools::synthetic::{SyntheticConfig, generate, projection};

/// Writes a synthetic dataset (JSONL) and its text projection (JSON, 8 rows).
#[derive(Parser)]
struct Args {
    /// The dataset file to write.
    #[arg(long)]
    out: PathBuf,
    /// The projection file to write (pass it to `dx-train --projection`).
    #[arg(long)]
    projection: PathBuf,
    /// Seed of the requests and the label noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed of the projection: use the same for the train and test sets.
    #[arg(long, default_value_t = 1)]
    projection_seed: u64,
    /// Number of requests.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Standard deviation of the label noise.
    #[arg(long, default_value_t = 0.01)]
    noise: f32,
    /// Prefix of the prompt ids: use different ones for sets that must not share prompts.
    #[arg(long, default_value = "syn-")]
    prefix: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = SyntheticConfig {
        seed: args.seed,
        requests: args.requests,
        noise: args.noise,
        prompt_prefix: args.prefix,
        ..SyntheticConfig::default()
    };
    let proj = projection(args.projection_seed);
    let records = generate(&config, &proj);
    std::fs::write(&args.out, to_jsonl(&records))
        .with_context(|| format!("writing {}", args.out.display()))?;
    let rows = serde_json::to_string(proj.rows()).context("serializing the projection")?;
    std::fs::write(&args.projection, rows)
        .with_context(|| format!("writing {}", args.projection.display()))?;
    print(&format!(
        "{} labels of {} requests -> {}\n",
        records.len(),
        config.requests,
        args.out.display()
    ))?;
    Ok(())
}
