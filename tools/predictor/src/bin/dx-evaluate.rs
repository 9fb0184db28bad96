//! `dx-evaluate`: compares the learned policy, the rule-based default and fixed levels on a
//! held-out labelled dataset; prints a markdown table and writes it with a PNG plot.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use diffusionx_predictor::{Predictor, Weights};
use diffusionx_predictor_tools::dataset::{
    LabelRecord, check_projection, check_steps_total, parse_jsonl, requests,
};
use diffusionx_predictor_tools::evaluate::{Strategy, evaluate, fixed_steps, markdown};
use diffusionx_predictor_tools::output::print;
use diffusionx_predictor_tools::plot;
use diffusionx_predictor_tools::setting::Setting;

/// Evaluates noise level policies on a held-out dataset.
#[derive(Parser)]
struct Args {
    /// The held-out labelled dataset (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Trained weights; without them only the rule-based default and fixed levels are compared.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The setting (context and policy) as JSON; see the `setting` module. Flags override it.
    #[arg(long)]
    setting: Option<PathBuf>,
    /// Overrides `policy.quality_target`.
    #[arg(long)]
    quality_target: Option<f32>,
    /// Overrides `policy.min_level`.
    #[arg(long)]
    min_level: Option<f32>,
    /// Overrides `policy.max_level`.
    #[arg(long)]
    max_level: Option<f32>,
    /// Overrides `policy.cloud_budget_ms`.
    #[arg(long)]
    cloud_budget_ms: Option<f32>,
    /// Overrides `context.steps_total`.
    #[arg(long)]
    steps_total: Option<u32>,
    /// Overrides `context.step_ms`.
    #[arg(long)]
    step_ms: Option<f32>,
    /// Overrides `context.expected_wait_ms`.
    #[arg(long)]
    expected_wait_ms: Option<f32>,
    /// Decision margins of the learned policy to add as extra rows (e.g. 0.02).
    #[arg(long, value_delimiter = ',')]
    margins: Vec<f32>,
    /// Fixed levels to compare.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7")]
    fixed: Vec<f32>,
    /// Where to write the markdown (table and legend).
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// Where to write the PNG plot.
    #[arg(long)]
    out_png: Option<PathBuf>,
}

fn setting(args: &Args) -> anyhow::Result<Setting> {
    let mut s: Setting = match &args.setting {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("in {}", path.display()))?,
        None => Setting::default(),
    };
    let p = &mut s.policy;
    p.quality_target = args.quality_target.unwrap_or(p.quality_target);
    p.min_level = args.min_level.unwrap_or(p.min_level);
    p.max_level = args.max_level.unwrap_or(p.max_level);
    p.cloud_budget_ms = args.cloud_budget_ms.unwrap_or(p.cloud_budget_ms);
    let c = &mut s.context;
    c.steps_total = args.steps_total.unwrap_or(c.steps_total);
    c.step_ms = args.step_ms.unwrap_or(c.step_ms);
    c.expected_wait_ms = args.expected_wait_ms.unwrap_or(c.expected_wait_ms);
    Ok(s)
}

/// The strategies to compare; learned weights must have the projection that made the labels'
/// text features.
fn strategies(args: &Args, records: &[LabelRecord]) -> anyhow::Result<Vec<Strategy>> {
    let mut out = Vec::new();
    if let Some(path) = &args.weights {
        let weights = Weights::from_json(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("in {}", path.display()))?;
        check_projection(records, &weights.projection().fingerprint()).with_context(|| {
            format!(
                "{}: evaluating weights {}",
                args.data.display(),
                path.display()
            )
        })?;
        let name = format!("learned ({})", weights.model_version());
        let predictor = Predictor::learned(weights);
        for margin in std::iter::once(0.0).chain(args.margins.iter().copied()) {
            out.push(Strategy::Predictor {
                name: if margin == 0.0 {
                    name.clone()
                } else {
                    format!("{name}, margin {margin}")
                },
                predictor: predictor.clone(),
                margin,
            });
        }
    }
    out.push(Strategy::Predictor {
        name: "rule-based default".to_owned(),
        predictor: Predictor::rule_based(),
        margin: 0.0,
    });
    out.extend(args.fixed.iter().map(|&s| Strategy::Fixed(s)));
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let records = parse_jsonl(&text).with_context(|| format!("in {}", args.data.display()))?;
    let s = setting(&args)?;
    let context = s.context.to_context().context("invalid context")?;
    let policy = s.policy.to_policy().context("invalid policy")?;
    let n = context.steps_total;
    check_steps_total(&records, n).with_context(|| {
        format!(
            "{}: evaluating with N = {n} cloud steps (--steps-total or the setting's \
             context.steps_total)",
            args.data.display()
        )
    })?;
    for &level in &args.fixed {
        fixed_steps(level, n).with_context(|| format!("--fixed {level} with N = {n}"))?;
    }
    let requests = requests(&records);
    let rows = evaluate(&requests, &strategies(&args, &records)?, &context, &policy)?;
    let table = markdown(&rows, &context, &policy, requests.len());
    print(&table)?;
    if let Some(path) = &args.out_md {
        let doc = format!(
            "{table}\nPlot: share meeting the target (y, 0 to 100%) against mean cloud steps \
             (x, 0 to {}); grid every 10% and {} steps; the legend names each policy. {}.\n",
            context.steps_total,
            plot::x_tick(context.steps_total),
            plot::legend(&rows)
        );
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.out_png {
        let png = plot::png(&plot::draw(&rows, context.steps_total));
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
