//! The evaluation: policies side by side on held-out requests.
//!
//! For each request and policy the chosen cloud step count `k` is read off the policy (a fixed
//! level `s` runs `floor(N * s)` steps, ignoring the budget and bounds, as the kiosk's old
//! fixed setting did; a predictor runs [`Predictor::decide`]). Then:
//!
//! - the *quality* is the request's labelled curve at the level actually run, `k / N`
//!   ([`Request::labelled_quality`]: linear between labelled levels);
//! - the *latency* is the cost model's [`expected_latency`] of `k` steps in the context;
//! - the request *meets the target* when that quality is at least the policy's target.
//!
//! A row holds the means over requests and the share meeting the target.

use diffusionx_predictor::{Context, InputError, Policy, Predictor, cloud_steps, expected_latency};

use crate::dataset::Request;

/// A policy under evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// A fixed level for every request.
    Fixed(f32),
    /// A predictor's decision, under a name for the table.
    Predictor {
        /// The row's name.
        name: String,
        /// The predictor.
        predictor: Predictor,
        /// Added to the quality target for the decision only (clamped to 1): a safety
        /// margin against the model's error. Hits are still counted against the target.
        margin: f32,
    },
}

impl Strategy {
    /// The row's name: `fixed 0.3` or the predictor's.
    pub fn name(&self) -> String {
        match self {
            Self::Fixed(s) => format!("fixed {s}"),
            Self::Predictor { name, .. } => name.clone(),
        }
    }
}

/// One policy's results.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The policy's name.
    pub name: String,
    /// Mean cloud steps per request.
    pub mean_cloud_steps: f64,
    /// Mean expected end-to-end latency, ms.
    pub mean_latency_ms: f64,
    /// Share of requests whose quality meets the target, 0 to 1.
    pub hit_rate: f64,
    /// Mean labelled quality at the chosen levels.
    pub mean_quality: f64,
}

/// The cloud steps a fixed level `s` runs of `steps_total`: `floor(N * s)`. Refuses a level
/// outside (0, 1] (NaN included) or one that runs no step, naming it as `fixed`.
pub fn fixed_steps(s: f32, steps_total: u32) -> Result<u32, InputError> {
    if !(s > 0.0 && s <= 1.0) {
        return Err(InputError::OutOfRange {
            field: "fixed",
            value: s.into(),
            expected: "(0, 1]",
        });
    }
    let k = cloud_steps((s * 10_000.0).round() as u32, steps_total);
    if k == 0 {
        return Err(InputError::OutOfRange {
            field: "fixed",
            value: s.into(),
            expected: "a level that runs at least one of the context's steps_total cloud steps",
        });
    }
    Ok(k)
}

/// Evaluates each strategy on the requests (see the module docs); a fixed level that
/// [`fixed_steps`] refuses is an error.
pub fn evaluate(
    requests: &[Request],
    strategies: &[Strategy],
    context: &Context,
    policy: &Policy,
) -> Result<Vec<Row>, InputError> {
    context.validate()?;
    policy.validate()?;
    let n = context.steps_total;
    strategies
        .iter()
        .map(|strategy| {
            let (mut steps, mut latency, mut hits, mut quality) = (0.0, 0.0, 0usize, 0.0);
            for r in requests {
                let k = match strategy {
                    Strategy::Fixed(s) => fixed_steps(*s, n)?,
                    Strategy::Predictor {
                        predictor, margin, ..
                    } => {
                        let asked = Policy {
                            quality_target: (policy.quality_target + margin).clamp(0.0, 1.0),
                            ..policy.clone()
                        };
                        predictor.decide(&r.features, context, &asked)?.cloud_steps
                    }
                };
                let q = r.labelled_quality(k as f32 / n as f32);
                steps += f64::from(k);
                latency += f64::from(expected_latency(context, k).total_ms());
                quality += f64::from(q);
                hits += usize::from(q >= policy.quality_target);
            }
            let count = requests.len().max(1) as f64;
            Ok(Row {
                name: strategy.name(),
                mean_cloud_steps: steps / count,
                mean_latency_ms: latency / count,
                hit_rate: hits as f64 / count,
                mean_quality: quality / count,
            })
        })
        .collect()
}

/// Whether `a` beats `b`: it meets the target at least as often with strictly fewer mean cloud
/// steps, or strictly more often with at most as many (Pareto dominance in (steps, hit rate)).
pub fn dominates(a: &Row, b: &Row) -> bool {
    (a.hit_rate >= b.hit_rate && a.mean_cloud_steps < b.mean_cloud_steps)
        || (a.hit_rate > b.hit_rate && a.mean_cloud_steps <= b.mean_cloud_steps)
}

/// Whether `a` beats a set of fixed levels, all three of:
///
/// 1. no fixed level dominates it ([`dominates`]);
/// 2. every fixed level with at most its mean cloud steps meets the target less often, and
///    every fixed level meeting the target at least as often uses more steps;
/// 3. it meets the target more often than any random mixture of two fixed levels with the
///    same mean cloud steps ([`mixture_hit_rate`]), so no way of using the fixed settings
///    is as good at its cost.
pub fn beats_all(a: &Row, fixed: &[Row]) -> bool {
    let pointwise = fixed.iter().all(|f| {
        !dominates(f, a) && (f.mean_cloud_steps > a.mean_cloud_steps || f.hit_rate < a.hit_rate)
    });
    pointwise && a.hit_rate > mixture_hit_rate(fixed, a.mean_cloud_steps)
}

/// The best hit rate the fixed levels reach with `steps` mean cloud steps, mixing two of them
/// at random per request: the upper envelope of the segments between their points, or the
/// best single level that uses at most `steps` (0 if none does).
pub fn mixture_hit_rate(fixed: &[Row], steps: f64) -> f64 {
    let mut best = 0.0f64;
    for f in fixed {
        if f.mean_cloud_steps <= steps {
            best = best.max(f.hit_rate);
        }
        for g in fixed {
            let (lo, hi) = (f.mean_cloud_steps, g.mean_cloud_steps);
            if lo < steps && steps < hi {
                let t = (steps - lo) / (hi - lo);
                best = best.max(f.hit_rate + t * (g.hit_rate - f.hit_rate));
            }
        }
    }
    best
}

/// The markdown table of rows, with the setting it was measured in.
pub fn markdown(rows: &[Row], context: &Context, policy: &Policy, requests: usize) -> String {
    let mut out = format!(
        "{requests} requests; quality target {}, levels {} to {}, budget {} ms; \
         {} cloud steps of {} ms, fixed latency {:.1} ms.\n\n",
        policy.quality_target,
        policy.min_level,
        policy.max_level,
        policy.cloud_budget_ms,
        context.steps_total,
        context.step_ms,
        expected_latency(context, 0).total_ms(),
    );
    out.push_str("| policy | mean cloud steps | mean expected latency (ms) | meets target | mean quality |\n");
    out.push_str("|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.2} | {:.1} | {:.1}% | {:.3} |\n",
            r.name,
            r.mean_cloud_steps,
            r.mean_latency_ms,
            100.0 * r.hit_rate,
            r.mean_quality
        ));
    }
    out
}
