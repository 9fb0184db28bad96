//! `dx-train`: fits the predictor's network to labelled JSONL datasets and/or the fleet's
//! session reports and writes the weights file; prints what was read and skipped, the
//! projection's fingerprint, and the training and validation RMSE.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use diffusionx_predictor::Projection;
use diffusionx_predictor_tools::dataset::{
    LabelRecord, LabelSource, check_projection, parse_jsonl,
};
use diffusionx_predictor_tools::output::print;
use diffusionx_predictor_tools::sessions::SessionLabels;
use diffusionx_predictor_tools::synthetic::EMBEDDING_LEN;
use diffusionx_predictor_tools::train::{TrainConfig, TrainReport, train};

/// Trains the noise level predictor (17 -> hidden relu -> hidden tanh -> 10, levels 0.1..1.0).
#[derive(Parser)]
struct Args {
    /// A labelled dataset (JSONL, see docs/predictor.md); repeatable.
    #[arg(long, required_unless_present = "sessions")]
    data: Vec<PathBuf>,
    /// Session reports, one JSON per line as `dxctl sessions --follow --json` prints them;
    /// repeatable. Thumbs up/down at the cloud's level become labels 1/0.
    #[arg(long)]
    sessions: Vec<PathBuf>,
    /// Weight of each fleet request's squared error against 1 for each dataset label.
    #[arg(long, default_value_t = 1.0)]
    session_weight: f64,
    /// The text projection the features' `text` were made with: a JSON array of 8 rows, or
    /// `standard` for the kiosks' default for a 768-value text encoder (`standard:N` for an
    /// N-value one, e.g. `standard:4` for the tiny test model); it ships inside the
    /// weights file, and session reports made with another one are skipped.
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

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The value of `--projection` that names the standard projection instead of a file.
const STANDARD: &str = "standard";

fn load_projection(path: &PathBuf) -> anyhow::Result<Projection> {
    let text = path.to_string_lossy();
    if text == STANDARD {
        return Projection::standard(EMBEDDING_LEN).context("the standard projection");
    }
    if let Some(width) = text.strip_prefix("standard:") {
        let width: usize =
            width.parse().ok().filter(|&w| w > 0).with_context(|| {
                format!("--projection {text}: the width must be a positive number")
            })?;
        return Projection::standard(width).context("the standard projection");
    }
    let rows: Vec<Vec<f32>> = serde_json::from_str(&read(path)?)
        .with_context(|| format!("{} is not a JSON array of rows", path.display()))?;
    Projection::new(rows).context("invalid projection")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let projection = load_projection(&args.projection)?;
    let fingerprint = projection.fingerprint();
    let mut report = format!("projection {fingerprint}\n");
    let mut records: Vec<LabelRecord> = Vec::new();
    for path in &args.data {
        let lines = parse_jsonl(&read(path)?).with_context(|| format!("in {}", path.display()))?;
        check_projection(&lines, &fingerprint).with_context(|| {
            format!(
                "{}: training with --projection {}",
                path.display(),
                args.projection.display()
            )
        })?;
        report.push_str(&format!("{}: {} labels\n", path.display(), lines.len()));
        records.extend(lines);
    }
    if !args.sessions.is_empty() {
        let mut fleet = SessionLabels::new(fingerprint);
        for path in &args.sessions {
            fleet.read(&path.display().to_string(), &read(path)?);
        }
        report.push_str(&fleet.summary());
        records.extend(fleet.records);
    }
    print(&report)?;
    if records.is_empty() {
        anyhow::bail!("no labels to train on");
    }
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
        session_weight: args.session_weight,
        ..defaults
    };
    let trained = train(&records, projection, args.model_version, &config)?;
    std::fs::write(&args.out, trained.weights.to_json())
        .with_context(|| format!("writing {}", args.out.display()))?;
    print(&summary(&trained, records.len(), &args.out))?;
    Ok(())
}

fn summary(r: &TrainReport, labels: usize, out_path: &std::path::Path) -> String {
    let mut out = format!(
        "{labels} labels; {} training and {} validation requests (split by prompt id)\n",
        r.train_requests, r.validation_requests
    );
    if r.ignored_fleet_requests > 0 {
        out.push_str(&format!(
            "{} fleet requests ignored (session weight 0)\n",
            r.ignored_fleet_requests
        ));
    }
    out.push_str(&format!(
        "epochs run {}, kept epoch {}\ntrain RMSE {:.4}\nvalidation RMSE {:.4}\n",
        r.epochs, r.best_epoch, r.train_rmse, r.validation_rmse
    ));
    let rmse = |v: Option<f32>| v.map_or("-".to_owned(), |v| format!("{v:.4}"));
    for s in &r.by_source {
        out.push_str(&format!(
            "  {}: {} training / {} validation requests, train RMSE {}, validation RMSE {}\n",
            source_name(s.source),
            s.train_requests,
            s.validation_requests,
            rmse(s.train_rmse),
            rmse(s.validation_rmse)
        ));
    }
    out.push_str(&format!("weights -> {}\n", out_path.display()));
    out
}

fn source_name(source: LabelSource) -> &'static str {
    match source {
        LabelSource::Synthetic => "synthetic",
        LabelSource::Label => "label",
        LabelSource::Fleet => "fleet (thumbs, 0 or 1)",
    }
}
