//! Summaries the kiosk computes from plain `f32` data it already holds at finalize.
//!
//! Sums run in `f64` so a 4x64x64 latent summarizes the same way on every machine to within
//! `f32` rounding of the result.

use crate::error::FeatureError;

/// How many of the last predicted clean latents (x0) [`x0_change`] reads: the last
/// `X0_WINDOW` steps of the preview, so `X0_WINDOW - 1` changes. Part of features v1.
pub const X0_WINDOW: usize = 3;

/// Mean and (population) standard deviation of a latent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentStats {
    /// Mean of all values.
    pub mean: f32,
    /// Population standard deviation: `sqrt(mean((x - mean)^2))`.
    pub std: f32,
}

/// Mean and standard deviation of the preview's final latent.
pub fn latent_stats(latent: &[f32]) -> Result<LatentStats, FeatureError> {
    if latent.is_empty() {
        return Err(FeatureError::Empty);
    }
    let n = latent.len() as f64;
    let mean = latent.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = latent
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let stats = LatentStats {
        mean: mean as f32,
        std: var.sqrt() as f32,
    };
    if stats.mean.is_finite() && stats.std.is_finite() {
        Ok(stats)
    } else {
        Err(FeatureError::NotFinite)
    }
}

/// How much the predicted clean latent was still changing at the end of the preview: a
/// settled preview (near 0) needs less cloud work.
///
/// `x0s` are the x0 predictions of consecutive steps, oldest first; only the last
/// [`X0_WINDOW`] are read. For each consecutive pair the change is the mean absolute
/// difference; the result is the mean of those changes divided by the RMS of the last x0
/// (`sqrt(mean(x0^2))`), so it does not depend on the latent's scale.
pub fn x0_change(x0s: &[&[f32]]) -> Result<f32, FeatureError> {
    if x0s.len() < 2 {
        return Err(FeatureError::TooFewSteps { found: x0s.len() });
    }
    let window = &x0s[x0s.len().saturating_sub(X0_WINDOW)..];
    let last = window[window.len() - 1];
    if last.is_empty() {
        return Err(FeatureError::Empty);
    }
    let mut total = 0.0f64;
    for pair in window.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        if prev.len() != next.len() {
            return Err(FeatureError::LengthMismatch {
                left: prev.len(),
                right: next.len(),
            });
        }
        let abs_diff: f64 = prev
            .iter()
            .zip(next)
            .map(|(&a, &b)| (f64::from(b) - f64::from(a)).abs())
            .sum();
        total += abs_diff / next.len() as f64;
    }
    let mean_change = total / (window.len() - 1) as f64;
    let rms = (last.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / last.len() as f64).sqrt();
    if !mean_change.is_finite() || !rms.is_finite() {
        return Err(FeatureError::NotFinite);
    }
    if rms == 0.0 {
        return Err(FeatureError::ZeroNorm);
    }
    Ok((mean_change / rms) as f32)
}

/// Cosine similarity of two embeddings, clamped to [-1, 1] against rounding.
pub fn cosine(a: &[f32], b: &[f32]) -> Result<f32, FeatureError> {
    if a.len() != b.len() {
        return Err(FeatureError::LengthMismatch {
            left: a.len(),
            right: b.len(),
        });
    }
    if a.is_empty() {
        return Err(FeatureError::Empty);
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na = norm(a);
    let nb = norm(b);
    if !dot.is_finite() || !na.is_finite() || !nb.is_finite() {
        return Err(FeatureError::NotFinite);
    }
    if na == 0.0 || nb == 0.0 {
        return Err(FeatureError::ZeroNorm);
    }
    Ok((dot / (na * nb)).clamp(-1.0, 1.0) as f32)
}

/// Euclidean norm, in `f64`.
pub(crate) fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn latent_stats_of_a_hand_computed_case() {
        // mean 2.5; deviations -1.5 -0.5 0.5 1.5; variance (2.25+0.25+0.25+2.25)/4 = 1.25.
        let s = latent_stats(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(close(s.mean, 2.5));
        assert!(close(s.std, 1.25f32.sqrt()));
        let c = latent_stats(&[-0.5; 7]).unwrap();
        assert_eq!((c.mean, c.std), (-0.5, 0.0));
    }

    #[test]
    fn latent_stats_refuses_empty_and_non_finite() {
        assert_eq!(latent_stats(&[]), Err(FeatureError::Empty));
        assert_eq!(latent_stats(&[1.0, f32::NAN]), Err(FeatureError::NotFinite));
        assert_eq!(latent_stats(&[f32::INFINITY]), Err(FeatureError::NotFinite));
    }

    #[test]
    fn x0_change_of_hand_computed_cases() {
        // One change: |2-3| over 4 values = 0.25; RMS of [3,-3,3,-3] = 3; 0.25/3.
        let prev = [2.0, -3.0, 3.0, -3.0];
        let last = [3.0, -3.0, 3.0, -3.0];
        assert!(close(x0_change(&[&prev, &last]).unwrap(), 0.25 / 3.0));
        // Settled: no change at all.
        assert_eq!(x0_change(&[&last, &last, &last]).unwrap(), 0.0);
        let a = [0.0, 0.0];
        let b = [1.0, 1.0];
        let c = [2.0, 1.0];
        let d = [2.0, 2.0];
        // Four x0s given: only the last three (b, c, d) are read: changes 0.5 and 0.5 -> 0.25.
        assert!(close(x0_change(&[&a, &b, &c, &d]).unwrap(), 0.25));
        // One change of 0.5; RMS of [2,1] = sqrt(2.5).
        assert!(close(x0_change(&[&b, &c]).unwrap(), 0.5 / (2.5f32).sqrt()));
        // Two changes of 1.0 each, mean 1.0; RMS of [2,2] = 2.
        assert!(close(x0_change(&[&a, &b, &d]).unwrap(), 0.5));
    }

    #[test]
    fn x0_change_refuses_what_it_cannot_summarize() {
        let a = [1.0, 1.0];
        assert_eq!(
            x0_change(&[&a]),
            Err(FeatureError::TooFewSteps { found: 1 })
        );
        assert_eq!(
            x0_change(&[&a, &[1.0, 1.0, 1.0]]),
            Err(FeatureError::LengthMismatch { left: 2, right: 3 })
        );
        assert_eq!(x0_change(&[&a, &[0.0, 0.0]]), Err(FeatureError::ZeroNorm));
        assert_eq!(
            x0_change(&[&a, &[0.0, f32::NAN]]),
            Err(FeatureError::NotFinite)
        );
    }

    #[test]
    fn cosine_of_hand_computed_cases() {
        assert!(close(
            cosine(&[1.0, 0.0], &[1.0, 1.0]).unwrap(),
            0.5f32.sqrt()
        ));
        assert_eq!(cosine(&[1.0, 2.0, 3.0], &[-1.0, -2.0, -3.0]).unwrap(), -1.0);
        assert_eq!(cosine(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap(), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 5.0]).unwrap(), 0.0);
        assert_eq!(
            cosine(&[0.0, 0.0], &[1.0, 1.0]),
            Err(FeatureError::ZeroNorm)
        );
        assert_eq!(
            cosine(&[1.0], &[1.0, 2.0]),
            Err(FeatureError::LengthMismatch { left: 1, right: 2 })
        );
        assert_eq!(cosine(&[], &[]), Err(FeatureError::Empty));
    }
}
