//! What the kiosk knows about a request at finalize, for free, and the model's input vector.
//!
//! Every feature is something the kiosk already computed while making previews: the final
//! prompt's pooled CLIP embedding (reduced by a stored [`Projection`]), its token count, how
//! much the prompt moved over the rounds, statistics of the final preview latent, how settled
//! the last denoising steps were, the resolution and the edge step count.
//!
//! [`Features::to_vector`] turns them into the fixed-order, normalized vector the MLP reads.
//! Order and normalization are *features v1* ([`FEATURES_VERSION`], [`FEATURE_NAMES`]); a
//! weights file names its inputs and is refused if they differ, so a model can never be fed a
//! vector it was not trained on. Changing anything here means a new version.

use crate::error::{FeatureError, InputError, WeightsError};
use crate::stats::norm;

/// How many dimensions the pooled text embedding is reduced to.
pub const TEXT_DIMS: usize = 8;

/// Length of the model's input vector.
pub const INPUT_LEN: usize = TEXT_DIMS + 9;

/// The version of the feature order and normalization below.
pub const FEATURES_VERSION: u32 = 1;

/// The names of the input vector's entries, in order (features v1); a weights file's `input`
/// must equal this list.
pub const FEATURE_NAMES: [&str; INPUT_LEN] = [
    "text_0",
    "text_1",
    "text_2",
    "text_3",
    "text_4",
    "text_5",
    "text_6",
    "text_7",
    "prompt_tokens",
    "rounds",
    "prompt_change",
    "latent_mean",
    "latent_std",
    "x0_change",
    "width",
    "height",
    "edge_steps",
];

/// CLIP's context length: prompt tokens are divided by it.
const CLIP_TOKENS: f32 = 77.0;
/// Rounds saturate here: after this many the visitor is iterating, however many more.
const ROUNDS_CAP: u32 = 16;
/// `x0_change` is log-scaled as `ln(1 + X0_SCALE * x) / ln(1 + X0_SCALE)`: settled previews
/// differ in the third decimal, so a linear scale would squash them together.
const X0_SCALE: f32 = 100.0;
/// Resolution is divided by SD 1.5's native size.
const NATIVE_SIDE: f32 = 512.0;
/// Edge steps are divided by a typical full schedule.
const TYPICAL_STEPS: f32 = 50.0;

/// The request as the kiosk sees it at finalize (also the `features` object of a dataset line
/// and of a session report; readers ignore fields they do not know, as everywhere in a
/// report, and a change of meaning is a new [`FEATURES_VERSION`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Features {
    /// The final prompt's pooled text embedding through the model's [`Projection`]: exactly
    /// [`TEXT_DIMS`] values for the learned predictor; the rule-based default ignores it.
    pub text: Vec<f32>,
    /// The final prompt's length in CLIP tokens (BOS and EOS included, at most 77).
    pub prompt_tokens: u32,
    /// Prompt rounds in this session, the final one included (at least 1).
    pub rounds: u32,
    /// Cosine of the final prompt's pooled embedding to the previous round's (see
    /// [`crate::cosine`]); 1.0 when there was one round.
    pub prompt_cosine: f32,
    /// Mean of the final preview latent (see [`crate::latent_stats`]).
    pub latent_mean: f32,
    /// Standard deviation of the final preview latent.
    pub latent_std: f32,
    /// How much the predicted clean latent still changed over the last steps, relative to its
    /// size (see [`crate::x0_change`]); 0 is fully settled.
    pub x0_change: f32,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Denoising steps the edge model ran for the final preview.
    pub edge_steps: u32,
}

impl Features {
    /// Checks every field is finite and in range (`text` is checked by [`Features::to_vector`]).
    pub fn validate(&self) -> Result<(), InputError> {
        for (field, value) in [
            ("features.prompt_cosine", self.prompt_cosine),
            ("features.latent_mean", self.latent_mean),
            ("features.latent_std", self.latent_std),
            ("features.x0_change", self.x0_change),
        ] {
            if !value.is_finite() {
                return Err(InputError::NotFinite { field, value });
            }
        }
        if let Some(value) = self.text.iter().copied().find(|v| !v.is_finite()) {
            return Err(InputError::NotFinite {
                field: "features.text",
                value,
            });
        }
        let checks: [(&'static str, f64, bool, &'static str); 7] = [
            (
                "features.prompt_cosine",
                self.prompt_cosine.into(),
                (-1.0..=1.0).contains(&self.prompt_cosine),
                "-1 to 1",
            ),
            (
                "features.latent_std",
                self.latent_std.into(),
                self.latent_std >= 0.0,
                "at least 0",
            ),
            (
                "features.x0_change",
                self.x0_change.into(),
                self.x0_change >= 0.0,
                "at least 0",
            ),
            (
                "features.rounds",
                self.rounds.into(),
                self.rounds >= 1,
                "at least 1",
            ),
            (
                "features.width",
                self.width.into(),
                self.width >= 1,
                "at least 1",
            ),
            (
                "features.height",
                self.height.into(),
                self.height >= 1,
                "at least 1",
            ),
            (
                "features.prompt_tokens",
                self.prompt_tokens.into(),
                self.prompt_tokens <= 77,
                "at most 77",
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

    /// The prompt change in [0, 1]: `(1 - prompt_cosine) / 2`, 0 for an unchanged prompt.
    pub fn prompt_change(&self) -> f32 {
        ((1.0 - self.prompt_cosine) / 2.0).clamp(0.0, 1.0)
    }

    /// The model's input vector, in the order of [`FEATURE_NAMES`] (features v1):
    ///
    /// | entries | value |
    /// |---|---|
    /// | `text_0..text_7` | `text` as is (a projection of the unit-length pooled embedding) |
    /// | `prompt_tokens` | `prompt_tokens / 77` |
    /// | `rounds` | `min(rounds, 16) / 16` |
    /// | `prompt_change` | `(1 - prompt_cosine) / 2` |
    /// | `latent_mean`, `latent_std` | as is (SD latents are scaled to about unit variance) |
    /// | `x0_change` | `min(1, ln(1 + 100 x) / ln(101))` |
    /// | `width`, `height` | pixels / 512 |
    /// | `edge_steps` | steps / 50 |
    ///
    /// Validates the features first; the text must have exactly [`TEXT_DIMS`] values.
    pub fn to_vector(&self) -> Result<[f32; INPUT_LEN], InputError> {
        self.validate()?;
        if self.text.len() != TEXT_DIMS {
            return Err(InputError::TextDims {
                expected: TEXT_DIMS,
                found: self.text.len(),
            });
        }
        let mut v = [0.0; INPUT_LEN];
        v[..TEXT_DIMS].copy_from_slice(&self.text);
        let x0 = ((X0_SCALE * self.x0_change).ln_1p() / X0_SCALE.ln_1p()).min(1.0);
        let rest = [
            self.prompt_tokens as f32 / CLIP_TOKENS,
            self.rounds.min(ROUNDS_CAP) as f32 / ROUNDS_CAP as f32,
            self.prompt_change(),
            self.latent_mean,
            self.latent_std,
            x0,
            self.width as f32 / NATIVE_SIDE,
            self.height as f32 / NATIVE_SIDE,
            self.edge_steps as f32 / TYPICAL_STEPS,
        ];
        v[TEXT_DIMS..].copy_from_slice(&rest);
        Ok(v)
    }
}

/// The stored linear map from the pooled CLIP embedding (768 values for ViT-L/14) down to
/// [`TEXT_DIMS`] values. It ships inside the weights file, with the model trained on it, so
/// the two cannot drift apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    rows: Vec<Vec<f32>>,
}

impl Projection {
    /// A projection of [`TEXT_DIMS`] rows, all of one non-zero length, all finite.
    pub fn new(rows: Vec<Vec<f32>>) -> Result<Self, WeightsError> {
        if rows.len() != TEXT_DIMS {
            return Err(WeightsError::Projection {
                reason: format!("{} rows, expected {TEXT_DIMS}", rows.len()),
            });
        }
        let width = rows[0].len();
        if width == 0 {
            return Err(WeightsError::Projection {
                reason: "rows are empty".to_owned(),
            });
        }
        for (i, row) in rows.iter().enumerate() {
            if row.len() != width {
                return Err(WeightsError::Projection {
                    reason: format!("row {i} has {} values, row 0 has {width}", row.len()),
                });
            }
            if let Some(j) = row.iter().position(|v| !v.is_finite()) {
                return Err(WeightsError::NotFinite {
                    location: format!("projection[{i}][{j}]"),
                });
            }
        }
        Ok(Self { rows })
    }

    /// The rows, each as long as the pooled embedding.
    pub fn rows(&self) -> &[Vec<f32>] {
        &self.rows
    }

    /// The embedding length this projection reads.
    pub fn input_len(&self) -> usize {
        self.rows[0].len()
    }

    /// `rows · (pooled / |pooled|)`: the pooled embedding is scaled to unit length first, so
    /// the text features do not depend on the encoder's output scale.
    pub fn project(&self, pooled: &[f32]) -> Result<Vec<f32>, FeatureError> {
        if pooled.len() != self.input_len() {
            return Err(FeatureError::LengthMismatch {
                left: self.input_len(),
                right: pooled.len(),
            });
        }
        let n = norm(pooled);
        if !n.is_finite() {
            return Err(FeatureError::NotFinite);
        }
        if n == 0.0 {
            return Err(FeatureError::ZeroNorm);
        }
        Ok(self
            .rows
            .iter()
            .map(|row| {
                let dot: f64 = row
                    .iter()
                    .zip(pooled)
                    .map(|(&w, &x)| f64::from(w) * f64::from(x))
                    .sum();
                (dot / n) as f32
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A settled, single-round 512x512 request with 25 edge steps.
    pub(crate) fn plain() -> Features {
        Features {
            text: vec![0.0; TEXT_DIMS],
            prompt_tokens: 12,
            rounds: 1,
            prompt_cosine: 1.0,
            latent_mean: 0.0,
            latent_std: 1.0,
            x0_change: 0.0,
            width: 512,
            height: 512,
            edge_steps: 25,
        }
    }

    #[test]
    fn names_are_unique_and_text_first() {
        for (i, name) in FEATURE_NAMES.iter().enumerate().take(TEXT_DIMS) {
            assert_eq!(*name, format!("text_{i}"));
        }
        let mut sorted = FEATURE_NAMES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), INPUT_LEN);
    }

    #[test]
    fn to_vector_normalizes_as_documented() {
        let f = Features {
            text: (0..TEXT_DIMS).map(|i| i as f32 / 10.0).collect(),
            prompt_tokens: 77,
            rounds: 20,
            prompt_cosine: 0.5,
            latent_mean: -0.25,
            latent_std: 0.75,
            x0_change: 0.01,
            width: 768,
            height: 256,
            edge_steps: 10,
        };
        let v = f.to_vector().unwrap();
        let expected = [
            0.0,
            0.1,
            0.2,
            0.3,
            0.4,
            0.5,
            0.6,
            0.7,
            1.0,                       // 77 / 77
            1.0,                       // min(20, 16) / 16
            0.25,                      // (1 - 0.5) / 2
            -0.25,                     // mean
            0.75,                      // std
            2.0f32.ln() / 101f32.ln(), // ln(1 + 100 * 0.01) / ln(101)
            1.5,                       // 768 / 512
            0.5,                       // 256 / 512
            0.2,                       // 10 / 50
        ];
        for (i, (a, b)) in v.iter().zip(expected).enumerate() {
            assert!((a - b).abs() < 1e-6, "{}: {a} != {b}", FEATURE_NAMES[i]);
        }
        // Very unsettled previews saturate at 1.
        let wild = Features {
            x0_change: 5.0,
            ..plain()
        };
        assert_eq!(wild.to_vector().unwrap()[13], 1.0);
    }

    #[test]
    fn to_vector_refuses_bad_features_by_name() {
        let short = Features {
            text: vec![0.0; 3],
            ..plain()
        };
        assert_eq!(
            short.to_vector(),
            Err(InputError::TextDims {
                expected: TEXT_DIMS,
                found: 3
            })
        );
        let nan = Features {
            latent_std: f32::NAN,
            ..plain()
        };
        assert!(matches!(
            nan.to_vector(),
            Err(InputError::NotFinite {
                field: "features.latent_std",
                ..
            })
        ));
        let zero_rounds = Features {
            rounds: 0,
            ..plain()
        };
        assert!(matches!(
            zero_rounds.validate(),
            Err(InputError::OutOfRange {
                field: "features.rounds",
                ..
            })
        ));
        let cos = Features {
            prompt_cosine: 1.5,
            ..plain()
        };
        assert!(matches!(
            cos.validate(),
            Err(InputError::OutOfRange {
                field: "features.prompt_cosine",
                ..
            })
        ));
    }

    fn identity_like() -> Projection {
        // Row i picks component i of a 10-dimensional embedding.
        Projection::new(
            (0..TEXT_DIMS)
                .map(|i| (0..10).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn projection_normalizes_then_projects() {
        let p = identity_like();
        // |[3, 4, 0...]| = 5, so the unit vector is [0.6, 0.8, 0...].
        let mut pooled = vec![0.0; 10];
        pooled[0] = 3.0;
        pooled[1] = 4.0;
        let t = p.project(&pooled).unwrap();
        let mut expected = vec![0.0; TEXT_DIMS];
        expected[0] = 0.6;
        expected[1] = 0.8;
        assert_eq!(t.len(), TEXT_DIMS);
        for (a, b) in t.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6);
        }
        // Scaling the embedding does not change the features.
        let scaled: Vec<f32> = pooled.iter().map(|x| x * 7.0).collect();
        assert_eq!(p.project(&scaled).unwrap(), t);
        assert_eq!(
            p.project(&[1.0; 9]),
            Err(FeatureError::LengthMismatch { left: 10, right: 9 })
        );
        assert_eq!(p.project(&[0.0; 10]), Err(FeatureError::ZeroNorm));
    }

    #[test]
    fn projection_refuses_wrong_shapes() {
        assert!(matches!(
            Projection::new(vec![vec![1.0; 4]; 3]),
            Err(WeightsError::Projection { .. })
        ));
        let mut ragged = vec![vec![1.0; 4]; TEXT_DIMS];
        ragged[5].pop();
        assert!(matches!(
            Projection::new(ragged),
            Err(WeightsError::Projection { .. })
        ));
        let mut nan = vec![vec![1.0; 4]; TEXT_DIMS];
        nan[2][3] = f32::NAN;
        match Projection::new(nan) {
            Err(WeightsError::NotFinite { location }) => assert_eq!(location, "projection[2][3]"),
            other => panic!("expected NotFinite, got {other:?}"),
        }
    }
}
