//! The noise level at finalize: the predictor's choice from the request and the measured
//! cloud and link, or the operator's fixed level (docs/predictor.md, "On the kiosk").

use std::sync::Arc;

use diffusionx_diffusion::NoiseLevel;
use diffusionx_fleet::{NoiseLevelMode, NoisePolicy, PredictorReport};
use diffusionx_predictor::{
    Context, Observation, Policy, Predictor, Projection, Weights, WeightsError,
};

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
    weights
        .check_text_width(width)
        .with_context(|| format!("the predictor weights {}", path.display()))?;
    Ok(weights)
}

/// Chooses the level; cheap to clone (the weights and the standard projection are shared).
#[derive(Debug, Clone)]
pub struct LevelChooser {
    predictor: Arc<Predictor>,
    /// `Projection::standard` of the model's width and its fingerprint, made once.
    standard: Arc<std::sync::OnceLock<(Projection, String)>>,
}

/// The level to send and, when the predictor chose it, what it saw and decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The level.
    pub level: NoiseLevel,
    /// The predictor's inputs and decision (`None`: fixed by the operator, no observation,
    /// or the predictor could not decide: see `error`).
    pub report: Option<PredictorReport>,
    /// Why the predictor could not decide (the fixed level was sent).
    pub error: Option<String>,
}

impl LevelChooser {
    /// The learned predictor when `weights` are given, else the rule-based default.
    pub fn new(weights: Option<Weights>) -> Self {
        Self {
            predictor: Arc::new(weights.map_or(Predictor::rule_based(), Predictor::learned)),
            standard: Arc::default(),
        }
    }

    fn standard(&self, width: usize) -> Result<Projection, WeightsError> {
        if let Some((p, _)) = self.standard.get()
            && p.input_len() == width
        {
            return Ok(p.clone());
        }
        let p = Projection::standard(width)?;
        let _ = self.standard.set((p.clone(), p.fingerprint()));
        Ok(p)
    }

    fn fingerprint(&self, projection: &Projection) -> String {
        match self.standard.get() {
            Some((p, fingerprint)) if p == projection => fingerprint.clone(),
            _ => projection.fingerprint(),
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
            error: None,
        };
        let failed = |why: String| {
            tracing::warn!(%why, "the predictor could not decide: the fixed level is used");
            Choice {
                level: fixed,
                report: None,
                error: Some(why),
            }
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
                match self.standard(width) {
                    Ok(p) => (&rule, p),
                    Err(why) => return failed(format!("no projection: {why}")),
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
                        projection: self.fingerprint(&projection),
                        context,
                        policy,
                        decision,
                    }),
                    error: None,
                },
                None => failed(format!(
                    "level {} bp is not a noise level",
                    decision.level_bp
                )),
            },
            Err(why) => failed(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusionx_predictor::{Activation, INPUT_LEN, LatentStats, Layer, Source};
    use diffusionx_protocol::LoadReport;

    fn observation() -> Observation {
        Observation {
            pooled: vec![0.5, -0.5, 1.0, 0.25],
            previous_pooled: None,
            prompt_tokens: 7,
            rounds: 1,
            latent: LatentStats {
                mean: 0.1,
                std: 0.9,
            },
            x0_change: 0.001,
            width: 256,
            height: 256,
            edge_steps: 25,
        }
    }

    fn measured(step_ms: Option<f32>, expected_wait_ms: u32) -> Measured {
        Measured {
            load: LoadReport {
                queue_depth: 0,
                running: 0,
                max_batch: 4,
                expected_wait_ms,
                step_ms: 0,
                accepting: true,
            },
            rtt_ms: 20.0,
            uplink_bytes_per_s: 1e6,
            step_ms,
            result_ms: 200.0,
            request_bytes: 8300,
        }
    }

    /// Weights whose curve is flat at `sigmoid(0) = 0.5` then closes half the gap per level:
    /// `q(0.1) = 0.5`, `q(0.2) = 0.75`, `q(0.3) = 0.875`, ...
    fn weights(width: usize) -> Weights {
        Weights::new(
            "halves-1".into(),
            (1..=10).map(|i| i as f32 / 10.0).collect(),
            Projection::standard(width).unwrap(),
            vec![Layer {
                w: vec![vec![0.0; INPUT_LEN]; 10],
                b: vec![0.0; 10],
                activation: Activation::Linear,
            }],
        )
        .unwrap()
    }

    fn fixed() -> NoiseLevel {
        NoiseLevel::from_bp(5000).unwrap()
    }

    #[test]
    fn fixed_mode_or_no_observation_sends_the_fixed_level_without_a_report() {
        let chooser = LevelChooser::new(None);
        let policy = NoisePolicy {
            noise_level_mode: NoiseLevelMode::Fixed,
            ..NoisePolicy::default()
        };
        let choice = chooser.choose(
            Some(&observation()),
            &measured(None, 0),
            50,
            &policy,
            fixed(),
        );
        assert_eq!(
            (choice.level, choice.report, choice.error),
            (fixed(), None, None)
        );
        let choice = chooser.choose(
            None,
            &measured(None, 0),
            50,
            &NoisePolicy::default(),
            fixed(),
        );
        assert_eq!(
            (choice.level, choice.report, choice.error),
            (fixed(), None, None)
        );
    }

    #[test]
    fn the_rule_based_default_decides_with_the_standard_projection() {
        let chooser = LevelChooser::new(None);
        let choice = chooser.choose(
            Some(&observation()),
            &measured(Some(50.0), 0),
            50,
            &NoisePolicy::default(),
            fixed(),
        );
        let report = choice.report.unwrap();
        // Settled, one round, 25 edge steps: d = 0.35, 13 of 50 steps, level 0.26 (the
        // documented case, docs/predictor.md).
        assert_eq!(report.decision.source, Source::RuleBased);
        assert_eq!((report.decision.cloud_steps, choice.level.bp()), (13, 2600));
        let standard = Projection::standard(4).unwrap();
        assert_eq!(report.projection, standard.fingerprint());
        assert_eq!(
            report.features.text,
            standard.project(&observation().pooled).unwrap()
        );
        assert_eq!(report.context.latent_bytes, 8300);
        assert_eq!(report.policy.quality_target, 0.8);
    }

    #[test]
    fn learned_weights_decide_when_they_fit_and_the_budget_lowers_the_level() {
        let chooser = LevelChooser::new(Some(weights(4)));
        let policy = NoisePolicy {
            min_noise_level: 0.1,
            max_noise_level: 1.0,
            ..NoisePolicy::default()
        };
        // Linear between grid points, q reaches 0.8 at 0.2 + 0.1 * 0.05 / 0.125 = 0.24: 12 of
        // 50 steps.
        let choice = chooser.choose(
            Some(&observation()),
            &measured(Some(50.0), 0),
            50,
            &policy,
            fixed(),
        );
        let d = choice.report.unwrap().decision;
        assert_eq!(
            d.source,
            Source::Learned {
                version: "halves-1".into()
            }
        );
        assert_eq!((d.cloud_steps, choice.level.bp()), (12, 2400));
        // A 3.5 s queue leaves 4000 - 3500 - 20 - 8.3 - 200 = 271.7 ms: 5 steps of 50 ms.
        let choice = chooser.choose(
            Some(&observation()),
            &measured(Some(50.0), 3500),
            50,
            &policy,
            fixed(),
        );
        let d = choice.report.unwrap().decision;
        assert_eq!((d.cloud_steps, choice.level.bp()), (5, 1000));
        // An unknown step time puts no pressure on the budget.
        let choice = chooser.choose(
            Some(&observation()),
            &measured(None, 3500),
            50,
            &policy,
            fixed(),
        );
        let report = choice.report.unwrap();
        assert_eq!(report.decision.cloud_steps, 12);
        assert_eq!(report.context.step_ms, UNKNOWN_STEP_MS);
    }

    #[test]
    fn weights_for_another_text_encoder_fall_back_to_the_rule() {
        let chooser = LevelChooser::new(Some(weights(768)));
        let choice = chooser.choose(
            Some(&observation()),
            &measured(Some(50.0), 0),
            50,
            &NoisePolicy::default(),
            fixed(),
        );
        let report = choice.report.unwrap();
        assert_eq!(report.decision.source, Source::RuleBased);
        assert_eq!(
            report.projection,
            Projection::standard(4).unwrap().fingerprint()
        );
    }

    #[test]
    fn a_weights_file_is_checked_against_the_text_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictor.json");
        std::fs::write(&path, weights(4).to_json()).unwrap();
        assert_eq!(load_weights(&path, 4).unwrap(), weights(4));
        let err = format!("{:#}", load_weights(&path, 768).unwrap_err());
        assert!(
            err.contains("4-value text embedding") && err.contains("gives 768"),
            "{err}"
        );
        std::fs::write(&path, "{").unwrap();
        let err = format!("{:#}", load_weights(&path, 4).unwrap_err());
        assert!(err.contains("predictor.json"), "{err}");
    }

    #[test]
    fn a_predictor_that_cannot_decide_sends_the_fixed_level_and_says_why() {
        let chooser = LevelChooser::new(None);
        // 3 cloud steps at most 0.3 of them: no whole step.
        let policy = NoisePolicy {
            max_noise_level: 0.3,
            ..NoisePolicy::default()
        };
        let choice = chooser.choose(
            Some(&observation()),
            &measured(Some(50.0), 0),
            3,
            &policy,
            fixed(),
        );
        assert_eq!((choice.level, choice.report), (fixed(), None));
        let why = choice.error.unwrap();
        assert!(why.contains("runs no step of a 3-step schedule"), "{why}");
    }
}
