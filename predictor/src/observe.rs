//! From what the kiosk measured to [`Features`]: the one assembly the kiosk, the `label` tool
//! and the tests share, so a model is trained on exactly what kiosks compute.
//!
//! - [`X0History`] keeps the last [`X0_WINDOW`] predicted clean latents of a preview as its
//!   steps run and gives [`x0_change`] at the end;
//! - [`Observation`] holds the raw facts at finalize (the pooled text embedding itself, not
//!   yet projected) and [`Observation::features`] turns them into [`Features`] through a
//!   [`Projection`];
//! - [`Projection::standard`] is the projection a kiosk uses when it has no trained model,
//!   the same on every machine for a given embedding width, so features reported by
//!   rule-based kiosks can train the first model; [`Projection::fingerprint`] names a
//!   projection in session reports.

use std::collections::VecDeque;

use crate::error::{FeatureError, WeightsError};
use crate::features::{Features, Projection, TEXT_DIMS};
use crate::stats::{LatentStats, X0_WINDOW, cosine, x0_change};

/// The last [`X0_WINDOW`] predicted clean latents of a preview, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct X0History {
    window: VecDeque<Vec<f32>>,
}

impl X0History {
    /// An empty history (a new preview).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records step `k`'s predicted clean latent, forgetting the oldest beyond the window.
    pub fn push(&mut self, x0: &[f32]) {
        if self.window.len() == X0_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(x0.to_vec());
    }

    /// Predictions held (at most [`X0_WINDOW`]).
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether no step was recorded.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// [`x0_change`] over the window. A one-step preview has no change to measure: it is
    /// reported as unsettled (1.0, the top of the feature's scale), not as settled.
    pub fn change(&self) -> Result<f32, FeatureError> {
        match self.window.len() {
            0 => Err(FeatureError::TooFewSteps { found: 0 }),
            1 => Ok(1.0),
            _ => {
                let slices: Vec<&[f32]> = self.window.iter().map(Vec::as_slice).collect();
                x0_change(&slices)
            }
        }
    }
}

/// What the kiosk knows about a request at finalize, before any model.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The final prompt's pooled text embedding (the text encoder's width).
    pub pooled: Vec<f32>,
    /// The previous round's pooled embedding (`None` for a single round).
    pub previous_pooled: Option<Vec<f32>>,
    /// The final prompt's length in CLIP tokens.
    pub prompt_tokens: u32,
    /// Prompt rounds, the final one included.
    pub rounds: u32,
    /// Mean and standard deviation of the final preview latent.
    pub latent: LatentStats,
    /// [`X0History::change`] of the final preview.
    pub x0_change: f32,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Denoising steps of the final preview.
    pub edge_steps: u32,
}

impl Observation {
    /// The features v1 of this request, the text through `projection`.
    pub fn features(&self, projection: &Projection) -> Result<Features, FeatureError> {
        let prompt_cosine = match &self.previous_pooled {
            Some(previous) => cosine(&self.pooled, previous)?,
            None => 1.0,
        };
        Ok(Features {
            text: projection.project(&self.pooled)?,
            prompt_tokens: self.prompt_tokens,
            rounds: self.rounds,
            prompt_cosine,
            latent_mean: self.latent.mean,
            latent_std: self.latent.std,
            x0_change: self.x0_change,
            width: self.width,
            height: self.height,
            edge_steps: self.edge_steps,
        })
    }
}

/// The seed of [`Projection::standard`] (part of features v1).
const STANDARD_SEED: u64 = 0x5eed_0001;

impl Projection {
    /// The standard projection for a pooled embedding of `width` values: [`TEXT_DIMS`] rows of
    /// independent standard normal values from a fixed seed (a Johnson-Lindenstrauss sketch:
    /// it keeps the geometry of unit embeddings on average). Every machine computes the same
    /// rows; the trainer uses it unless told otherwise, so weights trained on labels or on
    /// reports from rule-based kiosks carry it.
    pub fn standard(width: usize) -> Result<Self, WeightsError> {
        let mut state = STANDARD_SEED ^ (width as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut uniform = move || {
            // splitmix64, then the top 53 bits as a float in (0, 1).
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let rows = (0..TEXT_DIMS)
            .map(|_| {
                (0..width)
                    .map(|_| {
                        // Box-Muller.
                        let (u, v) = (uniform(), uniform());
                        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                    })
                    .collect()
            })
            .collect();
        Self::new(rows)
    }

    /// A short name of these exact rows (FNV-1a 64 of their `f32` bits, as 16 hex digits):
    /// session reports carry it so features are only ever trained with the projection that
    /// made them.
    pub fn fingerprint(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: [u8; 4]| {
            for b in bytes {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for row in self.rows() {
            eat((row.len() as u32).to_le_bytes());
            for v in row {
                eat(v.to_bits().to_le_bytes());
            }
        }
        format!("{hash:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::latent_stats;

    #[test]
    fn the_history_keeps_the_last_window_and_gives_its_change() {
        let mut h = X0History::new();
        assert_eq!(h.change(), Err(FeatureError::TooFewSteps { found: 0 }));
        h.push(&[9.0, 9.0]);
        assert_eq!(h.change(), Ok(1.0), "one step is unsettled");
        h.push(&[1.0, 1.0]);
        h.push(&[1.0, 2.0]);
        h.push(&[1.0, 2.0]);
        assert_eq!(h.len(), X0_WINDOW);
        // The window is [1,1], [1,2], [1,2]: changes 0.5 and 0, mean 0.25, RMS of the last
        // sqrt(2.5); the [9,9] step fell out.
        let expected = 0.25 / 2.5f32.sqrt();
        assert!((h.change().unwrap() - expected).abs() < 1e-7);
        let direct = x0_change(&[&[1.0, 1.0], &[1.0, 2.0], &[1.0, 2.0]]).unwrap();
        assert_eq!(h.change().unwrap(), direct);
    }

    #[test]
    fn an_observation_becomes_features_through_the_projection() {
        let projection = Projection::standard(4).unwrap();
        let latent = [0.5, -0.5, 1.5, 2.5];
        let obs = Observation {
            pooled: vec![1.0, 0.0, 0.0, 0.0],
            previous_pooled: Some(vec![0.0, 1.0, 0.0, 0.0]),
            prompt_tokens: 9,
            rounds: 3,
            latent: latent_stats(&latent).unwrap(),
            x0_change: 0.01,
            width: 256,
            height: 320,
            edge_steps: 4,
        };
        let f = obs.features(&projection).unwrap();
        // A unit basis vector picks column 0 of every row.
        let column: Vec<f32> = projection.rows().iter().map(|r| r[0]).collect();
        assert_eq!(f.text, column);
        assert_eq!(f.prompt_cosine, 0.0, "orthogonal rounds");
        assert_eq!((f.latent_mean, f.latent_std), (1.0, 1.25f32.sqrt()));
        assert_eq!(
            (f.prompt_tokens, f.rounds, f.width, f.height, f.edge_steps),
            (9, 3, 256, 320, 4)
        );
        assert!(f.to_vector().is_ok());
        let single = Observation {
            previous_pooled: None,
            ..obs.clone()
        };
        assert_eq!(single.features(&projection).unwrap().prompt_cosine, 1.0);
        let wrong_width = Observation {
            pooled: vec![1.0; 5],
            previous_pooled: None,
            ..obs
        };
        assert_eq!(
            wrong_width.features(&projection),
            Err(FeatureError::LengthMismatch { left: 4, right: 5 })
        );
    }

    #[test]
    fn the_standard_projection_is_fixed_per_width_and_named_by_its_fingerprint() {
        let a = Projection::standard(768).unwrap();
        assert_eq!(a, Projection::standard(768).unwrap());
        assert_eq!(a.input_len(), 768);
        assert_eq!(a.rows().len(), TEXT_DIMS);
        let b = Projection::standard(4).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        // Standard normal entries: mean near 0, variance near 1 over 6144 values.
        let all: Vec<f64> = a.rows().iter().flatten().map(|&v| f64::from(v)).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.08,
            "{mean} {var}"
        );
        // Pinned: a change to the generator changes every kiosk's features.
        assert_eq!(a.fingerprint(), "5fcc5abebe434b61");
        let mut moved = a.rows().to_vec();
        moved[3][100] += 1e-3;
        assert_ne!(
            Projection::new(moved).unwrap().fingerprint(),
            a.fingerprint()
        );
    }
}
