//! Training labels from the fleet's session reports (`dx-train --sessions`).
//!
//! Operators collect reports as JSONL, one [`SessionReport`] per line: what
//! `dxctl sessions --follow --json` prints (the report's own fields plus `"device"`, which lands
//! in the report's pass-through `extra` fields), or bare report JSON. A report becomes one
//! [`LabelRecord`] with source [`LabelSource::Fleet`] when it has a predictor object in its
//! finalize, took the cloud path and has the visitor's verdict:
//!
//! | label field | from the report |
//! |---|---|
//! | `features` | `finalize.predictor.features` as reported |
//! | `level` | `decision.cloud_steps / context.steps_total`: the share of the schedule the cloud ran |
//! | `cloud_steps` | `finalize.predictor.decision.cloud_steps` |
//! | `quality` | 1.0 for thumbs up, 0.0 for thumbs down |
//! | `prompt_id` | the report id (each session is its own request) |
//!
//! The level is the fraction that ran, `k / N`, not the level sent (`decision.level`, which
//! is `ceil(k * 10000 / N)` basis points or the policy's minimum, so at least `k / N`): the
//! cloud's work depends only on `k`, and the policy and the evaluation read the curve at
//! `k / N`. A label at the level sent would teach the model `q(0.33)` for work the decision
//! reads as `q(0.30)` (`min_level = 0.33`, `N = 20`: 6 steps).
//!
//! A thumbs label estimates the probability that the visitor was satisfied at that level: a
//! different scale from the label tool's similarity score; the trainer weights these requests
//! apart ([`crate::train::TrainConfig::session_weight`]).
//!
//! Nothing is dropped silently: every non-blank line is either a label or counted under the
//! first reason that applies, in this order: malformed (not a session report; with its line),
//! duplicate id (a report can arrive twice; the first is kept, across all files read), no
//! predictor data, malformed (invalid features, a level outside (0, 1], or cloud steps outside
//! `1..=context.steps_total`; with its line), not
//! the cloud path, no verdict, another projection (the features were made with a projection
//! other than the one being trained with, so they mean nothing to this model).

use std::collections::{BTreeMap, HashSet};

use diffusionx_fleet::{PredictorReport, SessionReport};
use diffusionx_predictor::InputError;

use crate::dataset::{LabelRecord, LabelSource};

/// The `finalize.path` of a session refined by the cloud.
pub const CLOUD_PATH: &str = "cloud";

/// Why a well-formed report gives no label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No finalize, or a finalize without a predictor object (older firmware, a fixed level,
    /// or no decision was made).
    NoPredictor,
    /// The session was refined locally (or never took a path): no cloud level was run.
    NotCloud,
    /// The visitor gave no thumbs up or down.
    NoVerdict,
    /// The features were made with the projection of this fingerprint.
    OtherProjection(String),
}

/// Why a line is not a usable report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Not JSON, or not the shape of a session report.
    #[error("not a session report: {0}")]
    Json(#[from] serde_json::Error),
    /// The reported features are invalid for the learned model.
    #[error("invalid predictor features: {0}")]
    Features(#[from] InputError),
    /// The decision's level is not in (0, 1].
    #[error("decision.level = {0} is not in (0, 1]")]
    Level(f32),
    /// The decision's cloud steps are not in `1..=context.steps_total`.
    #[error(
        "decision.cloud_steps = {cloud_steps} is not in 1..={steps_total} (context.steps_total)"
    )]
    Steps {
        /// `decision.cloud_steps`.
        cloud_steps: u32,
        /// `context.steps_total`.
        steps_total: u32,
    },
}

/// A line that was not a usable report.
#[derive(Debug)]
pub struct Malformed {
    /// The name of the file (as the caller gave it).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub error: ReportError,
}

/// How many lines gave no label, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipCounts {
    /// Malformed lines (listed in [`SessionLabels::malformed`]).
    pub malformed: usize,
    /// Reports whose id was already read.
    pub duplicate: usize,
    /// Reports without a predictor object.
    pub no_predictor: usize,
    /// Reports refined locally or never refined.
    pub not_cloud: usize,
    /// Reports without a thumbs verdict.
    pub no_verdict: usize,
    /// Reports made with another projection (details in
    /// [`SessionLabels::other_projections`]).
    pub other_projection: usize,
}

impl SkipCounts {
    /// All skipped lines.
    pub fn total(&self) -> usize {
        self.malformed
            + self.duplicate
            + self.no_predictor
            + self.not_cloud
            + self.no_verdict
            + self.other_projection
    }
}

/// The labels read so far from one or more files, and what was skipped.
#[derive(Debug)]
pub struct SessionLabels {
    fingerprint: String,
    seen: HashSet<String>,
    /// The labels, in the order read.
    pub records: Vec<LabelRecord>,
    /// Lines skipped, by reason.
    pub skipped: SkipCounts,
    /// The malformed lines, in the order read.
    pub malformed: Vec<Malformed>,
    /// Reports made with other projections: fingerprint -> count.
    pub other_projections: BTreeMap<String, usize>,
}

impl SessionLabels {
    /// Reads reports for training with the projection of this fingerprint
    /// (`Projection::fingerprint`).
    pub fn new(fingerprint: impl Into<String>) -> Self {
        Self {
            fingerprint: fingerprint.into(),
            seen: HashSet::new(),
            records: Vec::new(),
            skipped: SkipCounts::default(),
            malformed: Vec::new(),
            other_projections: BTreeMap::new(),
        }
    }

    /// Reads one JSONL file's text (`file` names it in [`Malformed`]); blank lines are
    /// ignored. Ids are remembered across calls, so a report repeated in another file is a
    /// duplicate too.
    pub fn read(&mut self, file: &str, text: &str) {
        for (i, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let report = match serde_json::from_str::<SessionReport>(raw) {
                Ok(report) => report,
                Err(e) => {
                    self.malformed_line(file, i + 1, e.into());
                    continue;
                }
            };
            if !self.seen.insert(report.id.clone()) {
                self.skipped.duplicate += 1;
                continue;
            }
            match label(&report, &self.fingerprint) {
                Ok(Ok(record)) => self.records.push(record),
                Ok(Err(skip)) => self.count(skip),
                Err(error) => self.malformed_line(file, i + 1, error),
            }
        }
    }

    fn malformed_line(&mut self, file: &str, line: usize, error: ReportError) {
        self.skipped.malformed += 1;
        self.malformed.push(Malformed {
            file: file.to_owned(),
            line,
            error,
        });
    }

    fn count(&mut self, skip: Skip) {
        let s = &mut self.skipped;
        match skip {
            Skip::NoPredictor => s.no_predictor += 1,
            Skip::NotCloud => s.not_cloud += 1,
            Skip::NoVerdict => s.no_verdict += 1,
            Skip::OtherProjection(fingerprint) => {
                s.other_projection += 1;
                *self.other_projections.entry(fingerprint).or_default() += 1;
            }
        }
    }

    /// The counts in words, one reason per line, for the CLI.
    pub fn summary(&self) -> String {
        let s = &self.skipped;
        let mut out = format!(
            "{} fleet labels from {} lines; skipped: {} malformed, {} duplicate id, \
             {} without predictor data, {} not refined by the cloud, {} without a thumbs \
             verdict, {} made with another projection\n",
            self.records.len(),
            self.records.len() + s.total(),
            s.malformed,
            s.duplicate,
            s.no_predictor,
            s.not_cloud,
            s.no_verdict,
            s.other_projection,
        );
        for (fingerprint, n) in &self.other_projections {
            out.push_str(&format!("  projection {fingerprint}: {n} reports\n"));
        }
        for m in &self.malformed {
            out.push_str(&format!("  {} line {}: {}\n", m.file, m.line, m.error));
        }
        out
    }
}

/// The label of one report for training with the projection `fingerprint`: `Ok(Ok(label))`,
/// `Ok(Err(why not))`, or an error when its predictor data are invalid. Checks in the order of
/// the module docs.
pub fn label(
    report: &SessionReport,
    fingerprint: &str,
) -> Result<Result<LabelRecord, Skip>, ReportError> {
    let Some(finalize) = &report.finalize else {
        return Ok(Err(Skip::NoPredictor));
    };
    let Some(predictor) = &finalize.predictor else {
        return Ok(Err(Skip::NoPredictor));
    };
    check(predictor)?;
    if finalize.path.as_deref() != Some(CLOUD_PATH) {
        return Ok(Err(Skip::NotCloud));
    }
    let Some(thumbs_up) = report.thumbs_up else {
        return Ok(Err(Skip::NoVerdict));
    };
    if predictor.projection != fingerprint {
        return Ok(Err(Skip::OtherProjection(predictor.projection.clone())));
    }
    Ok(Ok(LabelRecord {
        features: predictor.features.clone(),
        level: predictor.decision.cloud_steps as f32 / predictor.context.steps_total as f32,
        quality: if thumbs_up { 1.0 } else { 0.0 },
        cloud_steps: predictor.decision.cloud_steps,
        prompt_id: report.id.clone(),
        source: LabelSource::Fleet,
        scores: None,
        projection: Some(fingerprint.to_owned()),
    }))
}

/// The checks `dataset::parse_jsonl` makes of a label line (valid features, level in
/// (0, 1]), and that the steps run make a level: `1 <= cloud_steps <= steps_total`.
fn check(predictor: &PredictorReport) -> Result<(), ReportError> {
    predictor.features.to_vector()?;
    let level = predictor.decision.level;
    if !(level > 0.0 && level <= 1.0) {
        return Err(ReportError::Level(level));
    }
    let (cloud_steps, steps_total) = (
        predictor.decision.cloud_steps,
        predictor.context.steps_total,
    );
    if !(1..=steps_total).contains(&cloud_steps) {
        return Err(ReportError::Steps {
            cloud_steps,
            steps_total,
        });
    }
    Ok(())
}
