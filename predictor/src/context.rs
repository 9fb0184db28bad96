//! What the kiosk measures about the cloud and the link, and what the operator asks for.

use crate::error::InputError;

/// Basis points in a whole level: levels are handled in 1/10000 so the step arithmetic is
/// exact, as on the wire (`diffusionx_diffusion::NoiseLevel`).
pub const LEVEL_BP: u32 = 10_000;

/// The state of the cloud and the link at finalize, from the gateway's load probe and the
/// kiosk's own measurements (in session reports as is; readers ignore fields they do not know, as everywhere in a report).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Context {
    /// Jobs waiting at the gateway (load probe). The v1 cost model reads `expected_wait_ms`,
    /// which the gateway derives from the queue; the depth is carried for reports and models.
    pub queue_depth: u32,
    /// The gateway's estimate of the wait before a new job starts, in ms (load probe).
    pub expected_wait_ms: f32,
    /// Measured round-trip time to the gateway, in ms.
    pub rtt_ms: f32,
    /// Measured uplink throughput, in bytes per second.
    pub uplink_bytes_per_s: f32,
    /// Measured time of one cloud denoising step, in ms (load probe or past jobs).
    pub step_ms: f32,
    /// `N`: steps of the full cloud schedule; a level `s` runs `floor(N * s)` of them.
    pub steps_total: u32,
    /// Size of the request on the wire (latent, prompt, header), in bytes.
    pub latent_bytes: u32,
    /// The part that does not depend on the level: VAE decode on the gateway and download of
    /// the result, in ms (measured over past sessions).
    pub result_ms: f32,
}

impl Context {
    /// Checks every measurement is finite and in range; `steps_total` is 1 to 10000.
    pub fn validate(&self) -> Result<(), InputError> {
        for (field, value) in [
            ("context.expected_wait_ms", self.expected_wait_ms),
            ("context.rtt_ms", self.rtt_ms),
            ("context.uplink_bytes_per_s", self.uplink_bytes_per_s),
            ("context.step_ms", self.step_ms),
            ("context.result_ms", self.result_ms),
        ] {
            if !value.is_finite() {
                return Err(InputError::NotFinite { field, value });
            }
        }
        let checks: [(&'static str, f64, bool, &'static str); 6] = [
            (
                "context.expected_wait_ms",
                self.expected_wait_ms.into(),
                self.expected_wait_ms >= 0.0,
                "at least 0",
            ),
            (
                "context.rtt_ms",
                self.rtt_ms.into(),
                self.rtt_ms >= 0.0,
                "at least 0",
            ),
            (
                "context.uplink_bytes_per_s",
                self.uplink_bytes_per_s.into(),
                self.uplink_bytes_per_s > 0.0,
                "above 0",
            ),
            (
                "context.step_ms",
                self.step_ms.into(),
                self.step_ms > 0.0,
                "above 0",
            ),
            (
                "context.result_ms",
                self.result_ms.into(),
                self.result_ms >= 0.0,
                "at least 0",
            ),
            (
                "context.steps_total",
                self.steps_total.into(),
                (1..=LEVEL_BP).contains(&self.steps_total),
                "1 to 10000",
            ),
        ];
        for (field, value, ok, expected) in checks {
            if !ok {
                return Err(InputError::OutOfRange {
                    field,
                    value,
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// The operator's policy: how good the final image must be, how long a session may wait for
/// the cloud, and the range of levels allowed (in session reports as is).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Predicted quality the chosen level must reach, 0 to 1 (1 = the cloud's full redo of
    /// the preview, level 1.0, for the same prompt and seed; see `dx-label`).
    pub quality_target: f32,
    /// Lowest level ever chosen, in (0, 1].
    pub min_level: f32,
    /// Highest level ever chosen, in [`Policy::min_level`], 1].
    pub max_level: f32,
    /// Expected end-to-end cloud latency the session may spend, in ms; above it the level is
    /// lowered (never below `min_level`).
    pub cloud_budget_ms: f32,
}

impl Default for Policy {
    /// Target 0.8, levels 0.2 to 0.8 (never throw the preview away entirely), 4 s budget.
    fn default() -> Self {
        Self {
            quality_target: 0.8,
            min_level: 0.2,
            max_level: 0.8,
            cloud_budget_ms: 4000.0,
        }
    }
}

impl Policy {
    /// Checks the target is in [0, 1], the levels in (0, 1] (at least one basis point) with
    /// `min <= max`, and the budget positive.
    pub fn validate(&self) -> Result<(), InputError> {
        for (field, value) in [
            ("policy.quality_target", self.quality_target),
            ("policy.min_level", self.min_level),
            ("policy.max_level", self.max_level),
            ("policy.cloud_budget_ms", self.cloud_budget_ms),
        ] {
            if !value.is_finite() {
                return Err(InputError::NotFinite { field, value });
            }
        }
        let level = |l: f32| (0.5 / LEVEL_BP as f32..=1.0).contains(&l);
        let checks: [(&'static str, f32, bool, &'static str); 4] = [
            (
                "policy.quality_target",
                self.quality_target,
                (0.0..=1.0).contains(&self.quality_target),
                "0 to 1",
            ),
            (
                "policy.min_level",
                self.min_level,
                level(self.min_level),
                "(0, 1]",
            ),
            (
                "policy.max_level",
                self.max_level,
                level(self.max_level),
                "(0, 1]",
            ),
            (
                "policy.cloud_budget_ms",
                self.cloud_budget_ms,
                self.cloud_budget_ms > 0.0,
                "above 0",
            ),
        ];
        for (field, value, ok, expected) in checks {
            if !ok {
                return Err(InputError::OutOfRange {
                    field,
                    value: value.into(),
                    expected,
                });
            }
        }
        if self.min_bp() > self.max_bp() {
            return Err(InputError::MinAboveMax {
                min: self.min_level,
                max: self.max_level,
            });
        }
        Ok(())
    }

    /// `min_level` in basis points (rounded), for a validated policy.
    pub(crate) fn min_bp(&self) -> u32 {
        to_bp(self.min_level)
    }

    /// `max_level` in basis points (rounded), for a validated policy.
    pub(crate) fn max_bp(&self) -> u32 {
        to_bp(self.max_level)
    }
}

/// A level in (0, 1] to basis points, rounded (values are range-checked by the caller).
fn to_bp(level: f32) -> u32 {
    (level * LEVEL_BP as f32)
        .round()
        .clamp(1.0, LEVEL_BP as f32) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A quiet gateway on a fast link: 50 ms per step, 50-step schedule.
    pub(crate) fn quiet() -> Context {
        Context {
            queue_depth: 0,
            expected_wait_ms: 0.0,
            rtt_ms: 20.0,
            uplink_bytes_per_s: 1_000_000.0,
            step_ms: 50.0,
            steps_total: 50,
            latent_bytes: 32_768,
            result_ms: 200.0,
        }
    }

    #[test]
    fn context_validation_names_the_field() {
        assert_eq!(quiet().validate(), Ok(()));
        let cases: [(Context, &str); 5] = [
            (
                Context {
                    uplink_bytes_per_s: 0.0,
                    ..quiet()
                },
                "context.uplink_bytes_per_s",
            ),
            (
                Context {
                    step_ms: -1.0,
                    ..quiet()
                },
                "context.step_ms",
            ),
            (
                Context {
                    rtt_ms: f32::NAN,
                    ..quiet()
                },
                "context.rtt_ms",
            ),
            (
                Context {
                    steps_total: 0,
                    ..quiet()
                },
                "context.steps_total",
            ),
            (
                Context {
                    steps_total: 10_001,
                    ..quiet()
                },
                "context.steps_total",
            ),
        ];
        for (ctx, name) in cases {
            match ctx.validate() {
                Err(InputError::OutOfRange { field, .. } | InputError::NotFinite { field, .. }) => {
                    assert_eq!(field, name)
                }
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn policy_validation_names_the_field() {
        assert_eq!(Policy::default().validate(), Ok(()));
        let p = Policy::default();
        let cases: [(Policy, &str); 5] = [
            (
                Policy {
                    quality_target: 1.1,
                    ..p.clone()
                },
                "policy.quality_target",
            ),
            (
                Policy {
                    min_level: 0.0,
                    ..p.clone()
                },
                "policy.min_level",
            ),
            (
                Policy {
                    max_level: 1.5,
                    ..p.clone()
                },
                "policy.max_level",
            ),
            (
                Policy {
                    cloud_budget_ms: 0.0,
                    ..p.clone()
                },
                "policy.cloud_budget_ms",
            ),
            (
                Policy {
                    quality_target: f32::INFINITY,
                    ..p.clone()
                },
                "policy.quality_target",
            ),
        ];
        for (policy, name) in cases {
            match policy.validate() {
                Err(InputError::OutOfRange { field, .. } | InputError::NotFinite { field, .. }) => {
                    assert_eq!(field, name)
                }
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
        assert_eq!(
            Policy {
                min_level: 0.6,
                max_level: 0.5,
                ..p
            }
            .validate(),
            Err(InputError::MinAboveMax { min: 0.6, max: 0.5 })
        );
    }

    #[test]
    fn levels_round_to_basis_points() {
        let p = Policy {
            min_level: 0.33333,
            max_level: 1.0,
            ..Policy::default()
        };
        assert_eq!((p.min_bp(), p.max_bp()), (3333, 10_000));
    }
}
