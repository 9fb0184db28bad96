//! The rule-based default, used when no trained model is installed (and reported as such).
//!
//! It estimates the preview's *deficit* `d`, the share of the cloud model's quality it is
//! missing, from three signals, and assumes the quality curve
//!
//! ```text
//! q(s) = 1 - d * (1 - s)^2
//! ```
//!
//! so the preview as is scores `1 - d`, a full redo (`s = 1`) scores 1 (the cloud's own
//! image, which is what the default label measures against), and moderate levels close most
//! of the gap, as img2img does in practice. The level that meets a target `T` is then
//! `s = 1 - sqrt((1 - T) / d)` (0 when `d <= 1 - T`); the policy applies the same budget and
//! bounds as for the learned model.
//!
//! ```text
//! d = min(1, 0.35                                      base: a small model's preview
//!          + 0.15 * min(1, prompt_change / 0.25)       the prompt was still moving
//!          + 0.30 * min(1, x0_change / 0.05)           the preview had not settled
//!          + 0.20 * clamp((25 - edge_steps) / 20, 0, 1))   few edge steps
//! ```
//!
//! `prompt_change` is `(1 - cosine) / 2`, so a last-round cosine of 0.5 or less counts as a
//! whole new prompt. An x0 still changing by 5% of its size per step is fully unsettled. 25
//! edge steps or more count as a complete preview, 5 or fewer as a sketch. With the default
//! policy (target 0.8) this ranges from about 0.25 for a settled single-round preview to
//! about 0.55 for the worst case; the kiosk's fixed setting was 0.5.

use crate::curve::QualityCurve;
use crate::features::Features;

/// Deficit of any preview from the small model.
pub const BASE_DEFICIT: f32 = 0.35;
/// Deficit added by a prompt that changed completely in the last round.
pub const PROMPT_CHANGE_DEFICIT: f32 = 0.15;
/// `prompt_change` at which the prompt counts as completely changed.
pub const PROMPT_CHANGE_FULL: f32 = 0.25;
/// Deficit added by a preview that had not settled.
pub const UNSETTLED_DEFICIT: f32 = 0.30;
/// `x0_change` at which the preview counts as not settled at all.
pub const X0_CHANGE_FULL: f32 = 0.05;
/// Deficit added by a preview of few edge steps.
pub const FEW_STEPS_DEFICIT: f32 = 0.20;
/// Edge steps from which the preview counts as complete.
pub const COMPLETE_STEPS: f32 = 25.0;
/// How many steps below [`COMPLETE_STEPS`] make a sketch.
pub const SKETCH_RANGE: f32 = 20.0;

/// The preview's estimated deficit `d` in [0, 1] (see the module docs).
pub fn deficit(features: &Features) -> f32 {
    let changed = (features.prompt_change() / PROMPT_CHANGE_FULL).min(1.0);
    let unsettled = (features.x0_change / X0_CHANGE_FULL).clamp(0.0, 1.0);
    let few_steps = ((COMPLETE_STEPS - features.edge_steps as f32) / SKETCH_RANGE).clamp(0.0, 1.0);
    (BASE_DEFICIT
        + PROMPT_CHANGE_DEFICIT * changed
        + UNSETTLED_DEFICIT * unsettled
        + FEW_STEPS_DEFICIT * few_steps)
        .clamp(0.0, 1.0)
}

/// The rule's quality curve for a request.
pub(crate) fn curve(features: &Features) -> QualityCurve {
    QualityCurve::deficit(deficit(features))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::tests::plain;

    #[test]
    fn deficit_of_documented_cases() {
        assert_eq!(deficit(&plain()), 0.35);
        let unsettled = Features {
            x0_change: 0.025,
            ..plain()
        };
        assert!((deficit(&unsettled) - 0.5).abs() < 1e-6);
        let sketch = Features {
            edge_steps: 4,
            x0_change: 1.0,
            prompt_cosine: -1.0,
            rounds: 3,
            ..plain()
        };
        assert_eq!(deficit(&sketch), 1.0);
        // Cosine 0.8 -> change 0.1 -> 0.4 of the prompt term; 15 steps -> half the steps term.
        let edited = Features {
            prompt_cosine: 0.8,
            rounds: 2,
            edge_steps: 15,
            ..plain()
        };
        assert!((deficit(&edited) - (0.35 + 0.15 * 0.4 + 0.2 * 0.5)).abs() < 1e-6);
    }
}
