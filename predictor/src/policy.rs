//! The decision: from a quality curve, the measured context and the operator's policy to a
//! noise level and the cloud step count it implies.
//!
//! Everything runs in whole cloud steps `k` of the `N`-step schedule, since that is what the
//! cloud runs (`k = floor(N * s)`):
//!
//! 1. **Bounds.** The allowed steps are `k_lo..=k_hi` with `k_lo = max(1, floor(N * min))`
//!    and `k_hi = floor(N * max)` (an error if `k_hi = 0`: the policy allows no cloud work).
//! 2. **Quality.** The smallest `k` whose predicted quality `q(k / N)` meets the target;
//!    `k_hi` if none does (the best the bounds allow).
//! 3. **Cost.** If that `k` is expected to take longer than the budget (see [`crate::cost`]),
//!    the largest `k` that fits, but never below `k_lo`.
//! 4. **Level.** The smallest level in basis points that runs exactly `k` steps and lies in
//!    the bounds: `max(ceil(k * 10000 / N), min)`. It is `k / N` whenever that is in bounds
//!    and a whole number of basis points; the kiosk sends `level_bp` as is, so the gateway's
//!    `floor(N * bp / 10000)` is exactly `cloud_steps`.
//!
//! Step 2 depends only on the target and the curve, step 3 only on the context and budget,
//! and both pick monotonically; so a higher target never lowers the level, and more load, a
//! slower link or a smaller budget never raises it. The bounds hold always.

use crate::context::{Context, LEVEL_BP, Policy};
use crate::cost::{cloud_steps, expected_latency, level_bp_for_steps, max_steps_within};
use crate::curve::QualityCurve;
use crate::error::InputError;
use crate::features::Features;
use crate::rule;
use crate::weights::Weights;

/// Chooses noise levels: the learned model when one is installed, else the documented rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictor {
    /// The rule-based default of [`crate::rule`].
    RuleBased,
    /// A trained network.
    Learned(Weights),
}

/// Which predictor made a decision, for the session report (`{"learned": {"version": ...}}`
/// or `"rule_based"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The trained network with this `model_version`.
    Learned {
        /// The weights' `model_version`.
        version: String,
    },
    /// The rule-based default.
    RuleBased,
}

/// What decided the level, for the session report (`"target"`, `"budget"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The smallest level meeting the quality target (within the budget).
    Target,
    /// No allowed level meets the target: the maximum level, within the budget.
    TargetUnreachable,
    /// Lowered to the largest level within the cloud budget.
    Budget,
    /// Even the minimum level exceeds the budget: the minimum level.
    MinLevel,
}

/// The chosen level and what the predictor expects of it (in session reports as is).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// The noise level, `level_bp / 10000`, in the policy's bounds.
    pub level: f32,
    /// The noise level in basis points: what goes on the wire.
    pub level_bp: u16,
    /// Cloud denoising steps: `floor(steps_total * level_bp / 10000)`, at least 1.
    pub cloud_steps: u32,
    /// Predicted quality at `cloud_steps / steps_total`, 0 to 1.
    pub predicted_quality: f32,
    /// Expected end-to-end cloud latency, in ms.
    pub expected_latency_ms: f32,
    /// What decided the level.
    pub limit: Limit,
    /// Which predictor decided.
    pub source: Source,
}

impl Predictor {
    /// The rule-based default.
    pub fn rule_based() -> Self {
        Self::RuleBased
    }

    /// A trained network.
    pub fn learned(weights: Weights) -> Self {
        Self::Learned(weights)
    }

    /// Which predictor this is, as reported in decisions.
    pub fn source(&self) -> Source {
        match self {
            Self::RuleBased => Source::RuleBased,
            Self::Learned(w) => Source::Learned {
                version: w.model_version().to_owned(),
            },
        }
    }

    /// The predicted quality curve for a request.
    pub fn quality_curve(&self, features: &Features) -> Result<QualityCurve, InputError> {
        features.validate()?;
        match self {
            Self::RuleBased => Ok(rule::curve(features)),
            Self::Learned(w) => w.curve(features),
        }
    }

    /// The noise level for a request (see the module docs).
    pub fn decide(
        &self,
        features: &Features,
        context: &Context,
        policy: &Policy,
    ) -> Result<Decision, InputError> {
        context.validate()?;
        policy.validate()?;
        let curve = self.quality_curve(features)?;
        let n = context.steps_total;
        let (min_bp, max_bp) = (policy.min_bp(), policy.max_bp());
        let k_hi = cloud_steps(max_bp, n);
        if k_hi == 0 {
            return Err(InputError::NoCloudStep {
                steps_total: n,
                max_level: policy.max_level,
            });
        }
        let k_lo = cloud_steps(min_bp, n).max(1);
        let quality = |k: u32| curve.quality(k as f32 / n as f32);

        let (k_quality, quality_limit) = (k_lo..=k_hi)
            .find(|&k| quality(k) >= policy.quality_target)
            .map_or((k_hi, Limit::TargetUnreachable), |k| (k, Limit::Target));
        let k_budget = max_steps_within(context, policy.cloud_budget_ms);
        let (k, limit) = if k_quality <= k_budget {
            (k_quality, quality_limit)
        } else if k_budget >= k_lo {
            (k_budget, Limit::Budget)
        } else {
            (k_lo, Limit::MinLevel)
        };

        let bp = level_bp_for_steps(k, n).max(min_bp);
        debug_assert_eq!(cloud_steps(bp, n), k);
        debug_assert!(bp <= max_bp);
        Ok(Decision {
            level: bp as f32 / LEVEL_BP as f32,
            level_bp: u16::try_from(bp).expect("a level is at most 10000 bp"),
            cloud_steps: k,
            predicted_quality: quality(k),
            expected_latency_ms: expected_latency(context, k).total_ms(),
            limit,
            source: self.source(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::tests::quiet;
    use crate::features::TEXT_DIMS;
    use crate::features::tests::plain;
    use crate::weights::tests::{
        Rng, constant_weights, overflowing_weights, random_weights, tenths,
    };

    fn decide(p: &Predictor, f: &Features, c: &Context, policy: &Policy) -> Decision {
        p.decide(f, c, policy).unwrap()
    }

    /// Unbounded levels and budget: only the quality target decides.
    fn open_policy() -> Policy {
        Policy {
            quality_target: 0.8,
            min_level: 0.0001,
            max_level: 1.0,
            cloud_budget_ms: 1e9,
        }
    }

    #[test]
    fn a_learned_curve_that_is_nan_is_an_input_error_not_the_maximum_level() {
        // Without the check no level met the NaN target: k_hi, TargetUnreachable, and a
        // predicted_quality of NaN in the session report.
        let p = Predictor::learned(overflowing_weights());
        let err = p.decide(&plain(), &quiet(), &Policy::default());
        assert!(
            matches!(err, Err(InputError::NotFinite { field: "prediction", value }) if value.is_nan()),
            "{err:?}"
        );
    }

    #[test]
    fn rule_based_documented_cases() {
        let p = Predictor::rule_based();
        let ctx = quiet();
        let policy = Policy::default();
        // Settled, single round, 25 steps: d = 0.35, s >= 1 - sqrt(0.2 / 0.35) = 0.2440,
        // so 13 of 50 steps: level 0.26, q = 1 - 0.35 * 0.74^2 = 0.80834.
        let d = decide(&p, &plain(), &ctx, &policy);
        assert_eq!((d.cloud_steps, d.level_bp, d.level), (13, 2600, 0.26));
        assert!((d.predicted_quality - 0.808_34).abs() < 1e-5);
        assert_eq!((d.limit, d.source), (Limit::Target, Source::RuleBased));
        // Latency: 20 + 32.768 + 0 + 13 * 50 + 200.
        assert!((d.expected_latency_ms - 902.768).abs() < 1e-3);

        // Unsettled (d = 0.65): s >= 0.4453 -> 23 steps, level 0.46.
        let unsettled = Features {
            x0_change: 0.05,
            ..plain()
        };
        assert_eq!(decide(&p, &unsettled, &ctx, &policy).cloud_steps, 23);
        // Everything against it (d = 1): s >= 1 - sqrt(0.2) = 0.5528 -> 28 steps.
        let sketch = Features {
            x0_change: 1.0,
            edge_steps: 4,
            prompt_cosine: 0.0,
            rounds: 4,
            ..plain()
        };
        let d = decide(&p, &sketch, &ctx, &policy);
        assert_eq!((d.cloud_steps, d.level), (28, 0.56));

        // A 1 s budget: (1000 - 252.768) / 50 -> 14 steps, so the sketch is cut to 0.28.
        let tight = Policy {
            cloud_budget_ms: 1000.0,
            ..policy.clone()
        };
        let d = decide(&p, &sketch, &ctx, &tight);
        assert_eq!((d.cloud_steps, d.level, d.limit), (14, 0.28, Limit::Budget));
        // A budget below the fixed part: the minimum level, reported as such.
        let hopeless = Policy {
            cloud_budget_ms: 100.0,
            ..policy.clone()
        };
        let d = decide(&p, &sketch, &ctx, &hopeless);
        assert_eq!(
            (d.cloud_steps, d.level, d.limit),
            (10, 0.2, Limit::MinLevel)
        );
        // A target nothing reaches within max 0.8: the maximum.
        let perfect = Policy {
            quality_target: 1.0,
            ..policy
        };
        let d = decide(&p, &plain(), &ctx, &perfect);
        assert_eq!(
            (d.cloud_steps, d.level, d.limit),
            (40, 0.8, Limit::TargetUnreachable)
        );
    }

    #[test]
    fn learned_picks_the_smallest_level_meeting_the_target() {
        // Zero increments: q = 0.5, 0.75, 0.875, 0.9375, ... on the tenths grid.
        let w = constant_weights(vec![0.0; 10], tenths());
        let p = Predictor::learned(w);
        let mut policy = open_policy();
        policy.quality_target = 0.875;
        let d = decide(&p, &plain(), &quiet(), &policy);
        assert_eq!(
            (d.cloud_steps, d.level_bp, d.predicted_quality),
            (15, 3000, 0.875)
        );
        assert_eq!(
            d.source,
            Source::Learned {
                version: "constant".to_owned()
            }
        );
        // Target 0.8 lies between 0.2 (0.75) and 0.3 (0.875): interpolation gives s = 0.24,
        // i.e. 12 of 50 steps.
        policy.quality_target = 0.8;
        let d = decide(&p, &plain(), &quiet(), &policy);
        assert_eq!((d.cloud_steps, d.level), (12, 0.24));
        // Text of the wrong length is refused for the learned model, not guessed.
        let no_text = Features {
            text: vec![],
            ..plain()
        };
        assert_eq!(
            p.decide(&no_text, &quiet(), &policy),
            Err(InputError::TextDims {
                expected: TEXT_DIMS,
                found: 0
            })
        );
        // The rule-based default does not read the text.
        assert!(
            Predictor::rule_based()
                .decide(&no_text, &quiet(), &policy)
                .is_ok()
        );
    }

    #[test]
    fn levels_are_exactly_representable_and_in_bounds() {
        // 30 steps: 7 steps is 0.2333..., sent as 2334 bp, which the gateway runs as 7 steps.
        let w = constant_weights(vec![0.0; 10], tenths());
        let p = Predictor::learned(w);
        let ctx = Context {
            steps_total: 30,
            ..quiet()
        };
        let policy = Policy {
            quality_target: 0.78,
            ..open_policy()
        };
        let d = decide(&p, &plain(), &ctx, &policy);
        // q(7/30) = 0.75 + (0.2333 - 0.2) / 0.1 * 0.125 = 0.7917 >= 0.78; q(6/30) = 0.75.
        assert_eq!((d.cloud_steps, d.level_bp), (7, 2334));
        assert_eq!(cloud_steps(u32::from(d.level_bp), 30), 7);
        // A minimum between two step counts: 10 steps, min 0.35 -> floor(3.5) = 3 steps at
        // level 0.35 (not 0.3, which is below the minimum).
        let ctx = Context {
            steps_total: 10,
            ..quiet()
        };
        let bounded = Policy {
            quality_target: 0.0,
            min_level: 0.35,
            max_level: 0.39,
            ..open_policy()
        };
        let d = decide(&p, &plain(), &ctx, &bounded);
        assert_eq!((d.cloud_steps, d.level_bp), (3, 3500));
        // A maximum that runs no step is an error, not a silent zero.
        let none = Policy {
            min_level: 0.01,
            max_level: 0.05,
            ..bounded
        };
        assert_eq!(
            p.decide(&plain(), &ctx, &none),
            Err(InputError::NoCloudStep {
                steps_total: 10,
                max_level: 0.05
            })
        );
    }

    /// A random request, context and policy.
    fn random_case(rng: &mut Rng) -> (Features, Context, Policy) {
        let features = Features {
            text: (0..TEXT_DIMS).map(|_| rng.uniform(-1.0, 1.0)).collect(),
            prompt_tokens: (rng.next_u64() % 78) as u32,
            rounds: 1 + (rng.next_u64() % 8) as u32,
            prompt_cosine: rng.uniform(-1.0, 1.0),
            latent_mean: rng.uniform(-0.5, 0.5),
            latent_std: rng.uniform(0.5, 1.5),
            x0_change: rng.uniform(0.0, 0.1),
            width: 512,
            height: 512,
            edge_steps: 1 + (rng.next_u64() % 50) as u32,
        };
        let context = Context {
            queue_depth: (rng.next_u64() % 20) as u32,
            expected_wait_ms: rng.uniform(0.0, 3000.0),
            rtt_ms: rng.uniform(5.0, 300.0),
            uplink_bytes_per_s: rng.uniform(20_000.0, 5_000_000.0),
            step_ms: rng.uniform(20.0, 200.0),
            steps_total: [20, 25, 30, 50, 1000][(rng.next_u64() % 5) as usize],
            latent_bytes: 32_768,
            result_ms: rng.uniform(50.0, 500.0),
        };
        let a = rng.uniform(0.05, 1.0);
        let b = rng.uniform(0.05, 1.0);
        let policy = Policy {
            quality_target: rng.uniform(0.0, 1.0),
            min_level: a.min(b),
            max_level: a.max(b),
            cloud_budget_ms: rng.uniform(500.0, 10_000.0),
        };
        (features, context, policy)
    }

    /// Both predictors: the rule and a random network.
    fn predictors(seed: u64) -> [Predictor; 2] {
        [
            Predictor::rule_based(),
            Predictor::learned(random_weights(seed, 16)),
        ]
    }

    #[test]
    fn more_load_never_raises_the_level() {
        let mut rng = Rng(1);
        for case in 0..400 {
            let (f, c, policy) = random_case(&mut rng);
            let f_ok = |p: &Predictor| p.decide(&f, &c, &policy);
            for p in predictors(case) {
                let Ok(base) = f_ok(&p) else { continue };
                let loaded = [
                    Context {
                        queue_depth: c.queue_depth + 5,
                        expected_wait_ms: c.expected_wait_ms + rng.uniform(0.0, 5000.0),
                        ..c.clone()
                    },
                    Context {
                        rtt_ms: c.rtt_ms * rng.uniform(1.0, 10.0),
                        ..c.clone()
                    },
                    Context {
                        uplink_bytes_per_s: c.uplink_bytes_per_s * rng.uniform(0.01, 1.0),
                        ..c.clone()
                    },
                    Context {
                        step_ms: c.step_ms * rng.uniform(1.0, 5.0),
                        ..c.clone()
                    },
                    Context {
                        result_ms: c.result_ms + rng.uniform(0.0, 2000.0),
                        ..c.clone()
                    },
                ];
                for heavier in loaded {
                    let d = decide(&p, &f, &heavier, &policy);
                    assert!(
                        d.level_bp <= base.level_bp,
                        "case {case}: {heavier:?} raised {} to {}",
                        base.level_bp,
                        d.level_bp
                    );
                }
            }
        }
    }

    #[test]
    fn a_higher_target_never_lowers_the_level() {
        let mut rng = Rng(2);
        for case in 0..400 {
            let (f, c, policy) = random_case(&mut rng);
            for p in predictors(case) {
                let Ok(base) = p.decide(&f, &c, &policy) else {
                    continue;
                };
                let higher = Policy {
                    quality_target: rng.uniform(policy.quality_target, 1.0),
                    ..policy.clone()
                };
                let d = decide(&p, &f, &c, &higher);
                assert!(d.level_bp >= base.level_bp, "case {case}");
            }
        }
    }

    #[test]
    fn more_budget_never_lowers_the_level() {
        let mut rng = Rng(3);
        for case in 0..400 {
            let (f, c, policy) = random_case(&mut rng);
            for p in predictors(case) {
                let Ok(base) = p.decide(&f, &c, &policy) else {
                    continue;
                };
                let richer = Policy {
                    cloud_budget_ms: policy.cloud_budget_ms * rng.uniform(1.0, 4.0),
                    ..policy.clone()
                };
                let d = decide(&p, &f, &c, &richer);
                assert!(d.level_bp >= base.level_bp, "case {case}");
            }
        }
    }

    #[test]
    fn bounds_and_consistency_always_hold() {
        let mut rng = Rng(4);
        let mut decided = 0;
        for case in 0..2000 {
            let (f, c, policy) = random_case(&mut rng);
            for p in predictors(case) {
                let d = match p.decide(&f, &c, &policy) {
                    Ok(d) => d,
                    Err(InputError::NoCloudStep { .. }) => {
                        assert_eq!(cloud_steps(policy.max_bp(), c.steps_total), 0);
                        continue;
                    }
                    Err(e) => panic!("case {case}: {e}"),
                };
                decided += 1;
                let bp = u32::from(d.level_bp);
                assert!(
                    (policy.min_bp()..=policy.max_bp()).contains(&bp),
                    "case {case}"
                );
                assert_eq!(cloud_steps(bp, c.steps_total), d.cloud_steps, "case {case}");
                assert!(d.cloud_steps >= 1);
                assert_eq!(d.level, bp as f32 / 10_000.0);
                assert!((0.0..=1.0).contains(&d.predicted_quality));
                let latency = expected_latency(&c, d.cloud_steps).total_ms();
                assert_eq!(d.expected_latency_ms, latency);
                match d.limit {
                    Limit::Target => assert!(d.predicted_quality >= policy.quality_target),
                    Limit::TargetUnreachable => {
                        assert!(d.predicted_quality < policy.quality_target)
                    }
                    Limit::Budget => assert!(latency <= policy.cloud_budget_ms),
                    Limit::MinLevel => assert!(latency > policy.cloud_budget_ms),
                }
            }
        }
        assert!(decided > 3000, "only {decided} cases decided");
    }
}
