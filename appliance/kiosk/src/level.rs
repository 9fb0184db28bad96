//! The noise level at finalize: the predictor's choice from the request and the measured
//! cloud and link, or the operator's fixed level (docs/predictor.md, "On the kiosk").

use std::sync::Arc;

use diffusionx_diffusion::NoiseLevel;
use diffusionx_fleet::{NoiseLevelMode, NoisePolicy, PredictorReport};
use diffusionx_predictor::{Context, Observation, Policy, Predictor, Projection, Weights};

use crate::cloud::Measured;

/// The step time assumed when neither the gateway nor this kiosk has measured one yet (a
/// fresh gateway): so small that the cloud budget does not bind, reported as is.
pub const UNKNOWN_STEP_MS: f32 = 0.001;

/// Reads a weights file for a text encoder of `width` values, with a message naming the file
/// and what is wrong.
pub fn load_weights(path: &std::path::Path, width: usize) -> anyhow::Result<Weights> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the predictor weights {}", path.display()))?;
    let weights = Weights::from_json(&text)
        .with_context(|| format!("the predictor weights {}", path.display()))?;
    let expects = weights.projection().input_len();
    if expects != width {
        anyhow::bail!(
            "the predictor weights {} ({}) project a {expects}-value text embedding, this \
             model's text encoder gives {width}: they were trained for another model",
            path.display(),
            weights.model_version()
        );
    }
    Ok(weights)
}

/// Chooses the level; cheap to clone (the weights are shared).
#[derive(Debug, Clone)]
pub struct LevelChooser {
    predictor: Arc<Predictor>,
}

/// The level to send and, when the predictor chose it, what it saw and decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The level.
    pub level: NoiseLevel,
    /// The predictor's inputs and decision (`None`: fixed by the operator, or the predictor
    /// could not decide and the fixed level was used, logged).
    pub report: Option<PredictorReport>,
}

impl LevelChooser {
    /// The learned predictor when `weights` are given, else the rule-based default.
    pub fn new(weights: Option<Weights>) -> Self {
        Self {
            predictor: Arc::new(weights.map_or(Predictor::rule_based(), Predictor::learned)),
        }
    }

    /// The predictor in use.
    pub fn predictor(&self) -> &Predictor {
        &self.predictor
    }

    /// The level for a job of `steps_total` cloud steps. The learned model's projection
    /// reads the pooled embedding; if it was trained for another text encoder width (a model
    /// swapped without new weights) the rule-based default decides, with the standard
    /// projection so the report's features stay usable for training.
    pub fn choose(
        &self,
        observation: Option<&Observation>,
        measured: &Measured,
        steps_total: u16,
        policy: &NoisePolicy,
        fixed: NoiseLevel,
    ) -> Choice {
        let fixed_choice = Choice {
            level: fixed,
            report: None,
        };
        let Some(observation) = observation else {
            return fixed_choice;
        };
        if policy.noise_level_mode == NoiseLevelMode::Fixed {
            return fixed_choice;
        }
        let width = observation.pooled.len();
        let rule = Predictor::rule_based();
        let (predictor, projection) = match &*self.predictor {
            Predictor::Learned(w) if w.projection().input_len() == width => {
                (&*self.predictor, w.projection().clone())
            }
            other => {
                if let Predictor::Learned(w) = other {
                    tracing::warn!(
                        model = w.model_version(),
                        expects = w.projection().input_len(),
                        width,
                        "predictor weights do not fit this text encoder: rule-based default"
                    );
                }
                match Projection::standard(width) {
                    Ok(p) => (&rule, p),
                    Err(why) => {
                        tracing::warn!(%why, "no projection for the predictor");
                        return fixed_choice;
                    }
                }
            }
        };
        let context = Context {
            queue_depth: measured.load.queue_depth,
            expected_wait_ms: measured.load.expected_wait_ms as f32,
            rtt_ms: measured.rtt_ms,
            uplink_bytes_per_s: measured.uplink_bytes_per_s,
            step_ms: measured.step_ms.unwrap_or(UNKNOWN_STEP_MS),
            steps_total: u32::from(steps_total),
            latent_bytes: measured.request_bytes,
            result_ms: measured.result_ms,
        };
        let policy = Policy {
            quality_target: policy.quality_target,
            min_level: policy.min_noise_level,
            max_level: policy.max_noise_level,
            cloud_budget_ms: policy.cloud_budget_ms as f32,
        };
        let decided = observation
            .features(&projection)
            .map_err(|e| e.to_string())
            .and_then(|features| {
                predictor
                    .decide(&features, &context, &policy)
                    .map(|decision| (features, decision))
                    .map_err(|e| e.to_string())
            });
        match decided {
            Ok((features, decision)) => match NoiseLevel::from_bp(decision.level_bp) {
                Some(level) => Choice {
                    level,
                    report: Some(PredictorReport {
                        features,
                        projection: projection.fingerprint(),
                        context,
                        policy,
                        decision,
                    }),
                },
                None => fixed_choice,
            },
            Err(why) => {
                tracing::warn!(%why, "the predictor could not decide: the fixed level is used");
                fixed_choice
            }
        }
    }
}
