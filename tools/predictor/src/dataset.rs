//! The labelled dataset: JSONL, one line per (request, level) label.
//!
//! ```json
//! {"features": {"text": [0.1, ...8 values], "prompt_tokens": 12, "rounds": 1,
//!   "prompt_cosine": 1.0, "latent_mean": 0.0, "latent_std": 1.0, "x0_change": 0.002,
//!   "width": 512, "height": 512, "edge_steps": 25},
//!  "level": 0.3, "quality": 0.87, "cloud_steps": 15, "prompt_id": "p0042", "source": "synthetic"}
//! ```
//!
//! `features` are [`diffusionx_predictor::Features`] field by field. The crate's type ignores
//! unknown fields (session reports are read by older tools too), but a dataset line is read
//! through a private mirror that refuses them, so a line from a future features version is an
//! error here rather than trained as v1. Lines are parsed strictly (unknown fields refused,
//! inside `features` too) and checked: features valid with 8 text values, `level` in (0, 1],
//! `quality` in [0, 1]. [`check_steps_total`] checks that the labels' `cloud_steps` are what
//! the `N`-step schedule being evaluated runs at their levels. A *request* is the set of lines with the same `prompt_id`, features
//! and source; its labels form its measured quality curve. (Sources are never merged into one
//! curve: a fleet thumbs label and a label tool score are on different scales.)

use diffusionx_predictor::{Features, INPUT_LEN, InputError, cloud_steps};
use serde::{Deserialize, Deserializer, Serialize};

/// Where a label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSource {
    /// Drawn from the known quality function of [`crate::synthetic`].
    Synthetic,
    /// Measured by the `label` tool (edge preview, cloud refinement, score).
    Label,
    /// From the fleet's session reports.
    Fleet,
}

/// One dataset line: the quality measured when the cloud refined a request at a level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRecord {
    /// The request's features at finalize (unknown fields refused).
    #[serde(deserialize_with = "strict_features")]
    pub features: Features,
    /// The share of the `N`-step schedule the cloud ran, in (0, 1]: `cloud_steps / N` for
    /// label tool and fleet lines.
    pub level: f32,
    /// The measured quality, 0 to 1 (1 = the cloud's full redo, level 1.0).
    pub quality: f32,
    /// The cloud steps `k` the refinement ran: `floor(N * s)` for the level `s` sent, so
    /// `level` is `k / N` or (synthetic lines) a level that runs `k`.
    pub cloud_steps: u32,
    /// Identifies the prompt; the validation split never separates a prompt's lines.
    pub prompt_id: String,
    /// Where the label came from.
    pub source: LabelSource,
    /// The raw scores `quality` was derived from (label tool lines; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
    /// The [`Projection::fingerprint`](diffusionx_predictor::Projection::fingerprint) of the
    /// projection that made `features.text` (absent in files written before the field
    /// existed). [`check_projection`] refuses lines
    /// made with another projection than the one a model is trained or evaluated with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
}

/// [`Features`] as a dataset line holds them: every field, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesJson {
    text: Vec<f32>,
    prompt_tokens: u32,
    rounds: u32,
    prompt_cosine: f32,
    latent_mean: f32,
    latent_std: f32,
    x0_change: f32,
    width: u32,
    height: u32,
    edge_steps: u32,
}

/// Reads `features` strictly (the struct literal below stops compiling when [`Features`]
/// gains a field, so the two cannot drift apart).
fn strict_features<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Features, D::Error> {
    let f = FeaturesJson::deserialize(deserializer)?;
    Ok(Features {
        text: f.text,
        prompt_tokens: f.prompt_tokens,
        rounds: f.rounds,
        prompt_cosine: f.prompt_cosine,
        latent_mean: f.latent_mean,
        latent_std: f.latent_std,
        x0_change: f.x0_change,
        width: f.width,
        height: f.height,
        edge_steps: f.edge_steps,
    })
}

/// What the `label` tool measured of a refinement against the cloud's full redo (its
/// refinement of the same preview at level 1.0) for the same prompt and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scores {
    /// PSNR of the decoded images, in dB (capped at 100 for identical images).
    pub psnr_db: f32,
    /// Mean SSIM of the decoded images (luma, 8x8 windows), -1 to 1.
    pub ssim: f32,
    /// Root mean square difference of the final latents.
    pub latent_rmse: f32,
    /// CLIP score of the image against the prompt, when a CLIP model was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
}

/// A line that is not a valid label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// Not JSON, or not the shape of a label line.
    #[error("line {line}: {source}")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The features are invalid for the learned model.
    #[error("line {line}: {source}")]
    Features {
        /// 1-based line number.
        line: usize,
        /// What the predictor said.
        source: InputError,
    },
    /// `level` or `quality` is out of range or not finite.
    #[error("line {line}: {field} = {value} is out of range ({expected})")]
    OutOfRange {
        /// 1-based line number.
        line: usize,
        /// `level` or `quality`.
        field: &'static str,
        /// The value.
        value: f32,
        /// The range, in words.
        expected: &'static str,
    },
    /// The dataset has no lines.
    #[error("the dataset has no labels")]
    Empty,
    /// Labels whose `cloud_steps` are not `floor(N * level)` for the `N` being evaluated:
    /// they were made with another cloud schedule.
    #[error(
        "{mismatched} of {labels} labels did not run floor({steps_total} * level) cloud steps \
         (the first: level {level} ran {cloud_steps}); {}",
        implied_words(implied)
    )]
    StepsTotal {
        /// The `N` asked for.
        steps_total: u32,
        /// Labels that disagree with it.
        mismatched: usize,
        /// All labels.
        labels: usize,
        /// The first disagreeing label's level.
        level: f32,
        /// And its `cloud_steps`.
        cloud_steps: u32,
        /// Every `N` up to [`MAX_STEPS_TOTAL`] that agrees with all labels.
        implied: Vec<u32>,
    },
    /// Labels whose text features were made with another projection than the model's: their
    /// `text` values mean something else to it.
    #[error(
        "{mismatched} of {labels} labels were made with projection {found}, not {expected} \
         (the first: prompt {prompt_id}); train and evaluate with the projection that made \
         them (dx-label writes it next to its output as <out>.projection.json)"
    )]
    Projection {
        /// The fingerprint of the model's projection.
        expected: String,
        /// The first other fingerprint found.
        found: String,
        /// The `prompt_id` of the first label that has it.
        prompt_id: String,
        /// Labels with a fingerprint other than `expected`.
        mismatched: usize,
        /// All labels.
        labels: usize,
    },
}

/// The largest `N` [`check_steps_total`] considers when it names the `N` the labels imply.
pub const MAX_STEPS_TOTAL: u32 = 1000;

fn implied_words(implied: &[u32]) -> String {
    match implied {
        [] => format!(
            "no N up to {MAX_STEPS_TOTAL} fits every label: the dataset mixes cloud schedules"
        ),
        [n] => format!("the labels were made with N = {n} cloud steps: evaluate with N = {n}"),
        more => format!(
            "the labels fit N = {}: evaluate with the N they were made with",
            more.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Whether a label fits an `n`-step schedule: its `cloud_steps` are `floor(n * level)` (the
/// level read in basis points, as the kiosk sends it), or its level is the fraction that ran,
/// `cloud_steps / n`, within `f32` rounding (how the label tool and fleet labels place it).
fn runs(record: &LabelRecord, n: u32) -> bool {
    let bp = (record.level * 10_000.0).round() as u32;
    let k = record.cloud_steps;
    cloud_steps(bp, n) == k || (f64::from(record.level) * f64::from(n) - f64::from(k)).abs() < 1e-3
}

/// Checks that every label's `cloud_steps` is `floor(steps_total * level)`, i.e. that the
/// labels were made with the `N = steps_total` step schedule they are evaluated with; the
/// error names the `N` the labels imply.
pub fn check_steps_total(records: &[LabelRecord], steps_total: u32) -> Result<(), DatasetError> {
    let mut wrong = records.iter().filter(|r| !runs(r, steps_total));
    let Some(first) = wrong.next() else {
        return Ok(());
    };
    let implied = (1..=MAX_STEPS_TOTAL)
        .filter(|&n| records.iter().all(|r| runs(r, n)))
        .collect();
    Err(DatasetError::StepsTotal {
        steps_total,
        mismatched: 1 + wrong.count(),
        labels: records.len(),
        level: first.level,
        cloud_steps: first.cloud_steps,
        implied,
    })
}

/// Checks that every label that names its projection names `fingerprint`, the
/// [`Projection::fingerprint`](diffusionx_predictor::Projection::fingerprint) of the projection
/// a model is trained or evaluated with. Lines without one (written before the field
/// existed) are accepted.
pub fn check_projection(records: &[LabelRecord], fingerprint: &str) -> Result<(), DatasetError> {
    let mut wrong = records
        .iter()
        .filter(|r| r.projection.as_deref().is_some_and(|p| p != fingerprint));
    let Some(first) = wrong.next() else {
        return Ok(());
    };
    Err(DatasetError::Projection {
        expected: fingerprint.to_owned(),
        found: first.projection.clone().unwrap_or_default(),
        prompt_id: first.prompt_id.clone(),
        mismatched: 1 + wrong.count(),
        labels: records.len(),
    })
}

/// Parses a JSONL dataset (blank lines are skipped).
pub fn parse_jsonl(text: &str) -> Result<Vec<LabelRecord>, DatasetError> {
    let mut records = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: LabelRecord =
            serde_json::from_str(raw).map_err(|source| DatasetError::Json { line, source })?;
        record
            .features
            .clone()
            .to_vector()
            .map_err(|source| DatasetError::Features { line, source })?;
        let in_level = record.level > 0.0 && record.level <= 1.0;
        if !in_level {
            return Err(DatasetError::OutOfRange {
                line,
                field: "level",
                value: record.level,
                expected: "(0, 1]",
            });
        }
        if !(0.0..=1.0).contains(&record.quality) {
            return Err(DatasetError::OutOfRange {
                line,
                field: "quality",
                value: record.quality,
                expected: "[0, 1]",
            });
        }
        records.push(record);
    }
    if records.is_empty() {
        return Err(DatasetError::Empty);
    }
    Ok(records)
}

/// The dataset as JSONL, one line per record, newline-terminated.
pub fn to_jsonl(records: &[LabelRecord]) -> String {
    records
        .iter()
        .map(|r| {
            serde_json::to_string(r).expect("plain numbers and strings always serialize") + "\n"
        })
        .collect()
}

/// A request with its measured quality curve: the lines sharing a prompt id, features and
/// source.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt id.
    pub prompt_id: String,
    /// Where its labels came from (the trainer weights fleet requests apart).
    pub source: LabelSource,
    /// The features.
    pub features: Features,
    /// The model input (features v1).
    pub input: [f32; INPUT_LEN],
    /// `(level, quality)` labels, sorted by level.
    pub labels: Vec<(f32, f32)>,
}

impl Request {
    /// The labelled quality at level `s`, read like the crate's grid curve: linear between
    /// labelled levels, flat above the highest, linear down to 0 at `s = 0` below the lowest.
    pub fn labelled_quality(&self, s: f32) -> f32 {
        let levels: Vec<f32> = self.labels.iter().map(|l| l.0).collect();
        let quality: Vec<f32> = self.labels.iter().map(|l| l.1).collect();
        interpolate(&levels, &quality, s)
    }
}

/// Linear interpolation through `(levels[i], values[i])` exactly as
/// `diffusionx_predictor::QualityCurve` reads a grid (levels increasing, non-empty).
pub fn interpolate(levels: &[f32], values: &[f32], s: f32) -> f32 {
    let s = s.clamp(0.0, 1.0);
    let i = levels.partition_point(|&g| g <= s);
    if i == 0 {
        return values[0] * s / levels[0];
    }
    if i == levels.len() {
        return values[i - 1];
    }
    let (g0, g1) = (levels[i - 1], levels[i]);
    let t = (s - g0) / (g1 - g0);
    values[i - 1] + t * (values[i] - values[i - 1])
}

/// Groups records into requests (same prompt id, source and features), in order of first
/// appearance. Duplicate levels of one request are averaged.
pub fn requests(records: &[LabelRecord]) -> Vec<Request> {
    let mut out: Vec<Request> = Vec::new();
    for r in records {
        let features = r.features.clone();
        let found = out
            .iter_mut()
            .rev()
            .find(|q| q.prompt_id == r.prompt_id && q.source == r.source && q.features == features);
        let request = match found {
            Some(q) => q,
            None => {
                let input = features
                    .to_vector()
                    .expect("parse_jsonl validated the features");
                out.push(Request {
                    prompt_id: r.prompt_id.clone(),
                    source: r.source,
                    features,
                    input,
                    labels: Vec::new(),
                });
                out.last_mut().expect("just pushed")
            }
        };
        request.labels.push((r.level, r.quality));
    }
    for q in &mut out {
        q.labels.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut merged: Vec<(f32, f32, u32)> = Vec::new();
        for &(s, y) in &q.labels {
            match merged.last_mut() {
                Some(m) if m.0 == s => {
                    m.1 += y;
                    m.2 += 1;
                }
                _ => merged.push((s, y, 1)),
            }
        }
        q.labels = merged
            .into_iter()
            .map(|(s, y, n)| (s, y / n as f32))
            .collect();
    }
    out
}
