//! A predicted quality curve `q(s)`: how good the final image is expected to be if the cloud
//! redoes level `s` of the preview. Both predictors produce one; the policy reads it.

/// The predicted quality, 0 to 1, as a non-decreasing function of the level.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityCurve {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// The learned model's values at grid levels, linearly interpolated.
    Grid { levels: Vec<f32>, quality: Vec<f32> },
    /// The rule-based default: `1 - deficit * (1 - s)^2`.
    Deficit { deficit: f32 },
}

impl QualityCurve {
    /// A curve through `(levels[i], quality[i])`: linear between grid points, flat after the
    /// last, and falling linearly to 0 at `s = 0` before the first (pessimistic: the model was
    /// not asked about levels below its grid, so the policy only goes there for low targets).
    /// The caller guarantees equal, non-zero lengths and increasing levels.
    pub(crate) fn grid(levels: Vec<f32>, quality: Vec<f32>) -> Self {
        Self {
            kind: Kind::Grid { levels, quality },
        }
    }

    /// The rule-based curve for a preview missing `deficit` (0 to 1) of the cloud's quality.
    pub(crate) fn deficit(deficit: f32) -> Self {
        Self {
            kind: Kind::Deficit { deficit },
        }
    }

    /// The predicted quality at level `s` (clamped to [0, 1]).
    pub fn quality(&self, s: f32) -> f32 {
        let s = s.clamp(0.0, 1.0);
        match &self.kind {
            Kind::Deficit { deficit } => 1.0 - deficit * (1.0 - s).powi(2),
            Kind::Grid { levels, quality } => {
                let i = levels.partition_point(|&g| g <= s);
                if i == 0 {
                    return quality[0] * s / levels[0];
                }
                if i == levels.len() {
                    return quality[i - 1];
                }
                let (g0, g1) = (levels[i - 1], levels[i]);
                let t = (s - g0) / (g1 - g0);
                quality[i - 1] + t * (quality[i] - quality[i - 1])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_curve_interpolates_as_documented() {
        let c = QualityCurve::grid(vec![0.2, 0.4, 0.8], vec![0.5, 0.7, 0.9]);
        assert_eq!(c.quality(0.2), 0.5);
        assert!((c.quality(0.3) - 0.6).abs() < 1e-6);
        assert!((c.quality(0.6) - 0.8).abs() < 1e-6);
        assert_eq!(c.quality(0.8), 0.9);
        assert_eq!(c.quality(1.0), 0.9);
        // Below the grid: linear down to 0 at s = 0.
        assert!((c.quality(0.1) - 0.25).abs() < 1e-6);
        assert_eq!(c.quality(0.0), 0.0);
    }

    #[test]
    fn deficit_curve_as_documented() {
        let c = QualityCurve::deficit(0.5);
        assert_eq!(c.quality(0.0), 0.5);
        assert_eq!(c.quality(0.5), 0.875);
        assert_eq!(c.quality(1.0), 1.0);
    }
}
