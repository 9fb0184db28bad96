//! `dx-train`: fits the predictor's network to a labelled JSONL dataset and writes the weights
//! file; prints the training and validation RMSE.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use diffusionx_predictor::Projection;
use diffusionx_predictor_tools::dataset::parse_jsonl;
use diffusionx_predictor_tools::output::print;
use diffusionx_predictor_tools::train::{TrainConfig, train};

/// Trains the noise level predictor (17 -> hidden relu -> hidden tanh -> 10, levels 0.1..1.0).
#[derive(Parser)]
struct Args {
    /// The labelled dataset (JSONL, see docs/predictor.md).
    #[arg(long)]
    data: PathBuf,
    /// The text projection the dataset's `features.text` were made with: a JSON array of 8
    /// rows; it ships inside the weights file.
    #[arg(long)]
    projection: PathBuf,
    /// The weights file to write.
    #[arg(long)]
    out: PathBuf,
    /// What identifies these weights in decisions and session reports.
    #[arg(long)]
    model_version: String,
    /// Seed of the initialization, the shuffles and the validation split.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Width of each of the two hidden layers.
    #[arg(long, default_value_t = 32)]
    hidden: usize,
    /// Most epochs.
    #[arg(long, default_value_t = 300)]
    max_epochs: usize,
    /// Epochs without a better validation loss before stopping.
    #[arg(long, default_value_t = 30)]
    patience: usize,
    /// Requests per mini-batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f64,
    /// Share of prompt ids held out for validation.
    #[arg(long, default_value_t = 0.2)]
    validation_share: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let records = parse_jsonl(&text).with_context(|| format!("in {}", args.data.display()))?;
    let rows: Vec<Vec<f32>> = serde_json::from_str(
        &std::fs::read_to_string(&args.projection)
            .with_context(|| format!("reading {}", args.projection.display()))?,
    )
    .with_context(|| format!("{} is not a JSON array of rows", args.projection.display()))?;
    let projection = Projection::new(rows).context("invalid projection")?;
    let defaults = TrainConfig::default();
    let config = TrainConfig {
        seed: args.seed,
        hidden: defaults
            .hidden
            .iter()
            .map(|&(_, activation)| (args.hidden, activation))
            .collect(),
        max_epochs: args.max_epochs,
        patience: args.patience,
        batch: args.batch,
        learning_rate: args.learning_rate,
        validation_share: args.validation_share,
        ..defaults
    };
    let report = train(&records, projection, args.model_version, &config)?;
    std::fs::write(&args.out, report.weights.to_json())
        .with_context(|| format!("writing {}", args.out.display()))?;
    print(&format!(
        "{} labels; {} training and {} validation requests (split by prompt id)\n\
         epochs run {}, kept epoch {}\n\
         train RMSE {:.4}\nvalidation RMSE {:.4}\nweights -> {}\n",
        records.len(),
        report.train_requests,
        report.validation_requests,
        report.epochs,
        report.best_epoch,
        report.train_rmse,
        report.validation_rmse,
        args.out.display()
    ))?;
    Ok(())
}
