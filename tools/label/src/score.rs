//! How close a refinement is to the reference: PSNR and SSIM of the decoded images, RMSE of
//! the latents, and the mapping of one of them to the dataset's `quality` in [0, 1].
//!
//! Images are the refiner's decoded output: planar `[3, H, W]` RGB in [0, 1] (dynamic range
//! `L = 1`), compared before any 8-bit encoding. Sums run in `f64`.

use diffusionx_predictor_tools::dataset::Scores;

use crate::error::LabelError;

/// The PSNR of identical images (where `10 log10(1 / 0)` would be infinite).
pub const PSNR_CAP_DB: f32 = 100.0;
/// SSIM's window side, in pixels (square, uniform weights, every position: stride 1).
pub const SSIM_WINDOW: usize = 8;
/// SSIM's `C1 = (0.01 L)^2` and `C2 = (0.03 L)^2` for `L = 1` (Wang et al. 2004).
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;
/// ITU-R BT.601 luma weights of R, G and B.
const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// Checks that two images or latents can be compared: the same non-zero length, and every
/// value finite (a NaN would otherwise score as perfect, PSNR's `min` dropping it, or turn
/// into a `null` in the dataset).
fn same_len(what: &'static str, a: &[f32], b: &[f32]) -> Result<(), LabelError> {
    if a.len() != b.len() || a.is_empty() {
        return Err(LabelError::Compare {
            what,
            reason: format!("{} and {} values", a.len(), b.len()),
        });
    }
    if let Some(value) = a.iter().chain(b).copied().find(|v| !v.is_finite()) {
        return Err(LabelError::NotFinite { what, value });
    }
    Ok(())
}

fn mean_squared_difference(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    sum / a.len() as f64
}

/// PSNR in dB of two images in [0, 1] over all their values: `10 log10(1 / MSE)`, capped at
/// [`PSNR_CAP_DB`] (identical images reach the cap exactly). Images holding NaN or an
/// infinity are refused ([`LabelError::NotFinite`]), as by [`latent_rmse`] and [`ssim`].
pub fn psnr_db(a: &[f32], b: &[f32]) -> Result<f32, LabelError> {
    same_len("images", a, b)?;
    let mse = mean_squared_difference(a, b);
    if mse == 0.0 {
        return Ok(PSNR_CAP_DB);
    }
    Ok(((-10.0 * mse.log10()) as f32).min(PSNR_CAP_DB))
}

/// Root mean square difference of two latents.
pub fn latent_rmse(a: &[f32], b: &[f32]) -> Result<f32, LabelError> {
    same_len("latents", a, b)?;
    Ok(mean_squared_difference(a, b).sqrt() as f32)
}

/// The BT.601 luma plane of a planar `[3, H, W]` image.
fn luma(image: &[f32], pixels: usize) -> Vec<f64> {
    let (r, rest) = image.split_at(pixels);
    let (g, b) = rest.split_at(pixels);
    (0..pixels)
        .map(|i| LUMA[0] * f64::from(r[i]) + LUMA[1] * f64::from(g[i]) + LUMA[2] * f64::from(b[i]))
        .collect()
}

/// A summed-area table of `values` (`(h + 1) x (w + 1)`, zero first row and column), so any
/// window's sum costs four lookups.
struct Integral {
    w1: usize,
    sums: Vec<f64>,
}

impl Integral {
    fn new(values: impl Iterator<Item = f64>, h: usize, w: usize) -> Self {
        let w1 = w + 1;
        let mut sums = vec![0.0; (h + 1) * w1];
        let mut values = values;
        for y in 0..h {
            let mut row = 0.0;
            for x in 0..w {
                row += values.next().expect("h * w values");
                sums[(y + 1) * w1 + x + 1] = sums[y * w1 + x + 1] + row;
            }
        }
        Self { w1, sums }
    }

    /// Sum over the window of side [`SSIM_WINDOW`] whose top left pixel is `(y, x)`.
    fn window(&self, y: usize, x: usize) -> f64 {
        let (y1, x1) = (y + SSIM_WINDOW, x + SSIM_WINDOW);
        let at = |y: usize, x: usize| self.sums[y * self.w1 + x];
        at(y1, x1) - at(y, x1) - at(y1, x) + at(y, x)
    }
}

/// Mean SSIM of two planar `[3, height, width]` images in [0, 1], on their BT.601 luma: every
/// [`SSIM_WINDOW`]-pixel square window (stride 1, uniform weights, population variances),
///
/// ```text
/// SSIM = (2 mx my + C1) (2 sxy + C2) / ((mx^2 + my^2 + C1) (sx^2 + sy^2 + C2))
/// ```
///
/// with `C1 = 0.01^2`, `C2 = 0.03^2`, averaged over the windows. 1 for identical images.
pub fn ssim(a: &[f32], b: &[f32], height: usize, width: usize) -> Result<f32, LabelError> {
    same_len("images", a, b)?;
    let pixels = height * width;
    if a.len() != 3 * pixels || height < SSIM_WINDOW || width < SSIM_WINDOW {
        return Err(LabelError::Compare {
            what: "images",
            reason: format!(
                "{} values are not a [3, {height}, {width}] image of at least \
                 {SSIM_WINDOW}x{SSIM_WINDOW} pixels",
                a.len()
            ),
        });
    }
    let (x, y) = (luma(a, pixels), luma(b, pixels));
    let table = |f: &dyn Fn(usize) -> f64| Integral::new((0..pixels).map(f), height, width);
    let sx = table(&|i| x[i]);
    let sy = table(&|i| y[i]);
    let sxx = table(&|i| x[i] * x[i]);
    let syy = table(&|i| y[i] * y[i]);
    let sxy = table(&|i| x[i] * y[i]);
    let n = (SSIM_WINDOW * SSIM_WINDOW) as f64;
    let mut total = 0.0;
    let mut windows = 0usize;
    for top in 0..=height - SSIM_WINDOW {
        for left in 0..=width - SSIM_WINDOW {
            let mx = sx.window(top, left) / n;
            let my = sy.window(top, left) / n;
            let vx = sxx.window(top, left) / n - mx * mx;
            let vy = syy.window(top, left) / n - my * my;
            let cov = sxy.window(top, left) / n - mx * my;
            total += (2.0 * mx * my + C1) * (2.0 * cov + C2)
                / ((mx * mx + my * my + C1) * (vx + vy + C2));
            windows += 1;
        }
    }
    Ok((total / windows as f64) as f32)
}

/// Which score becomes the dataset's `quality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Score {
    /// `clamp(ssim, 0, 1)`.
    #[default]
    Ssim,
    /// `clamp((psnr_db - 10) / 30, 0, 1)`: 10 dB (unrelated images) is 0, 40 dB (hard to
    /// tell apart) and above is 1.
    Psnr,
    /// `exp(-latent_rmse)`: SD latents are scaled to about unit variance, so an RMSE as large
    /// as the latent itself scores `1/e`; identical latents score 1.
    Latent,
    /// `clamp(clip / 100, 0, 1)`: the CLIP score of the image against its prompt (prompt
    /// fidelity, not closeness to the reference; needs a CLIP model, [`crate::clip`]).
    Clip,
}

impl Score {
    /// The quality in [0, 1] of a refinement with these scores; `None` for [`Score::Clip`]
    /// where the scores hold no CLIP score.
    pub fn quality(self, scores: &Scores) -> Option<f32> {
        Some(match self {
            Self::Ssim => scores.ssim.clamp(0.0, 1.0),
            Self::Psnr => ((scores.psnr_db - 10.0) / 30.0).clamp(0.0, 1.0),
            Self::Latent => (-scores.latent_rmse).exp().clamp(0.0, 1.0),
            Self::Clip => (scores.clip? / 100.0).clamp(0.0, 1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A planar gray image (R = G = B) from its luma values.
    fn gray(values: &[f32]) -> Vec<f32> {
        values.repeat(3)
    }

    #[test]
    fn identical_images_score_one_and_the_psnr_cap() {
        let values: Vec<f32> = (0..16 * 12).map(|i| (i % 7) as f32 / 7.0).collect();
        let a = [
            values.clone(),
            values.iter().map(|v| 1.0 - v).collect(),
            values,
        ]
        .concat();
        assert_eq!(ssim(&a, &a, 12, 16).expect("same shape"), 1.0);
        assert_eq!(psnr_db(&a, &a).expect("same shape"), PSNR_CAP_DB);
        assert_eq!(latent_rmse(&a, &a).expect("same shape"), 0.0);
    }

    #[test]
    fn a_constant_offset_scores_its_hand_computed_values() {
        // 0.5 against 0.6 everywhere: MSE 0.01, PSNR 20 dB; every window has zero variance,
        // so SSIM = (2 * 0.5 * 0.6 + C1) / (0.25 + 0.36 + C1) = 0.6001 / 0.6101.
        let a = gray(&[0.5; 10 * 9]);
        let b = gray(&[0.6; 10 * 9]);
        assert!((psnr_db(&a, &b).expect("same shape") - 20.0).abs() < 1e-4);
        let expected = 0.6001 / 0.6101;
        assert!((f64::from(ssim(&a, &b, 9, 10).expect("same shape")) - expected).abs() < 1e-6);
        assert!((latent_rmse(&a, &b).expect("same shape") - 0.1).abs() < 1e-6);
    }

    #[test]
    fn an_inverted_checkerboard_scores_its_hand_computed_ssim() {
        // One 8x8 window: both means 0.5, both variances 0.25, covariance -0.25:
        // SSIM = 1 * (-0.5 + C2) / (0.5 + C2). MSE 1: PSNR 0 dB.
        let checker: Vec<f32> = (0..64).map(|i| ((i / 8 + i % 8) % 2) as f32).collect();
        let inverse: Vec<f32> = checker.iter().map(|v| 1.0 - v).collect();
        let (a, b) = (gray(&checker), gray(&inverse));
        let expected = (-0.5 + 0.0009) / (0.5 + 0.0009);
        assert!((f64::from(ssim(&a, &b, 8, 8).expect("one window")) - expected).abs() < 1e-6);
        assert_eq!(psnr_db(&a, &b).expect("same shape"), 0.0);
    }

    #[test]
    fn ssim_reads_luma_and_averages_every_window() {
        // 9x8 pixels: two windows (top 0 and 1). Only the bottom row differs, in blue only:
        // luma differs by 0.114 there, so the first window is identical (1) and the second
        // is not.
        let base = [0.2f32; 72];
        let mut blue = base;
        for v in &mut blue[64..] {
            *v = 1.2;
        }
        let a = [base, base, base].concat();
        let b = [base, base, blue].concat();
        // Second window: x = 0.2 everywhere, y = 0.2 with the last row 0.314.
        let n = 64.0;
        let my = (56.0 * 0.2 + 8.0 * 0.314) / n;
        let vy = (56.0 * 0.04 + 8.0 * 0.314f64.powi(2)) / n - my * my;
        let second = (2.0 * 0.2 * my + C1) * C2 / ((0.04 + my * my + C1) * (vy + C2));
        let got = f64::from(ssim(&a, &b, 9, 8).expect("two windows"));
        assert!((got - (1.0 + second) / 2.0).abs() < 1e-5, "{got}");
    }

    #[test]
    fn mismatched_or_tiny_images_are_refused() {
        assert!(matches!(
            psnr_db(&[0.0; 3], &[0.0; 6]),
            Err(LabelError::Compare { what: "images", .. })
        ));
        assert!(ssim(&[0.0; 3 * 49], &[0.0; 3 * 49], 7, 7).is_err());
        assert!(latent_rmse(&[], &[]).is_err());
    }

    #[test]
    fn non_finite_images_and_latents_are_refused_not_scored() {
        // Without the check a NaN image scored PSNR 100 dB (`f32::min` drops the NaN), so
        // quality 1 by --score psnr, and NaN SSIM and RMSE became `null` in the dataset.
        let good = gray(&[0.5; 64]);
        let mut bad = good.clone();
        bad[70] = f32::NAN;
        let refused = |r: Result<f32, LabelError>| match r {
            Err(LabelError::NotFinite { what, value }) => (what, value.is_nan()),
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(psnr_db(&bad, &good)), ("images", true));
        assert_eq!(refused(psnr_db(&good, &bad)), ("images", true));
        assert_eq!(refused(ssim(&bad, &good, 8, 8)), ("images", true));
        assert_eq!(refused(latent_rmse(&good, &bad)), ("latents", true));
        let mut infinite = good.clone();
        infinite[0] = f32::INFINITY;
        assert!(matches!(
            latent_rmse(&infinite, &good),
            Err(LabelError::NotFinite {
                what: "latents",
                value
            }) if value == f32::INFINITY
        ));
    }

    #[test]
    fn each_score_maps_to_quality_as_documented() {
        let scores = |psnr_db: f32, ssim: f32, latent_rmse: f32| Scores {
            psnr_db,
            ssim,
            latent_rmse,
            clip: None,
        };
        let quality = |score: Score, scores: Scores| score.quality(&scores).unwrap();
        assert_eq!(quality(Score::Ssim, scores(0.0, 0.75, 0.0)), 0.75);
        assert_eq!(quality(Score::Ssim, scores(0.0, -0.3, 0.0)), 0.0);
        assert_eq!(quality(Score::Psnr, scores(25.0, 0.0, 0.0)), 0.5);
        assert_eq!(quality(Score::Psnr, scores(100.0, 0.0, 0.0)), 1.0);
        assert_eq!(quality(Score::Psnr, scores(5.0, 0.0, 0.0)), 0.0);
        assert_eq!(quality(Score::Latent, scores(0.0, 0.0, 0.0)), 1.0);
        assert!((quality(Score::Latent, scores(0.0, 0.0, 2f32.ln())) - 0.5).abs() < 1e-7);
        let with_clip = |clip: f32| Scores {
            clip: Some(clip),
            ..scores(0.0, 0.0, 0.0)
        };
        assert_eq!(quality(Score::Clip, with_clip(31.5)), 0.315);
        assert_eq!(quality(Score::Clip, with_clip(0.0)), 0.0);
        assert_eq!(quality(Score::Clip, with_clip(130.0)), 1.0);
        assert_eq!(Score::Clip.quality(&scores(0.0, 0.9, 0.0)), None);
    }
}
