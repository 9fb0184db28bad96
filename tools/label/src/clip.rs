//! The optional CLIP score: how well an image matches its prompt, by a Hugging Face
//! `CLIPModel` folder (`openai/clip-vit-large-patch14`, `-base-patch32`, ...) on candle.
//!
//! `CLIP score = 100 * max(0, cos(image_embeds, text_embeds))`, torchmetrics' `CLIPScore`,
//! with the projected (not normalized) features of transformers' `get_image_features` and
//! `get_text_features`. It judges prompt fidelity, not closeness to the cloud's image.
//!
//! The folder holds `config.json` (see [`ClipScorer::load`]), `model.safetensors` (keys `text_model.*`,
//! `vision_model.*`, `text_projection.weight`, `visual_projection.weight`, any float dtype:
//! computed in f32), the tokenizer (`tokenizer.json`, `tokenizer_config.json`, read by
//! `diffusionx_text::ClipTokenizer`: 77 ids padded with `<|endoftext|>` as transformers pads
//! them) and optionally `preprocessor_config.json` (checked against [`preprocess`]).

mod config;
pub mod preprocess;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::ClipModel;
use diffusionx_text::{ClipTokenizer, TokenizerError};

/// Why a CLIP model could not be loaded or could not score.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClipError {
    /// A file of the folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A config file is malformed or asks for what is not implemented.
    #[error("{path}: {field}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `vision_config.hidden_act`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be loaded or could not encode the prompt.
    #[error("CLIP tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The tokenizer's end token is not its largest id, which the text tower's pooling
    /// (candle's: at the largest id) needs.
    #[error(
        "the CLIP tokenizer's end token ({eos}) is not its largest id ({largest} occurs before it)"
    )]
    EndToken {
        /// The end token's id.
        eos: u32,
        /// A larger id before it.
        largest: u32,
    },
    /// candle failed: loading the weights or running the model.
    #[error("CLIP model, {what}: {source}")]
    Model {
        /// What was being done.
        what: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The image or the features hold NaN or an infinity: there is no score to give.
    #[error("the {what} are not finite")]
    NotFinite {
        /// `image` values, `image features` or `text features`.
        what: &'static str,
    },
    /// The image is not a planar `[3, height, width]` one.
    #[error("{len} values are not a [3, {height}, {width}] image")]
    Image {
        /// The values given.
        len: usize,
        /// The height given.
        height: usize,
        /// The width given.
        width: usize,
    },
}

/// Wraps a candle error with what was being done.
fn candle<T>(what: &'static str, result: candle_core::Result<T>) -> Result<T, ClipError> {
    result.map_err(|source| ClipError::Model { what, source })
}

/// A prompt's projected CLIP text features.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFeatures(pub Vec<f32>);

/// A loaded CLIP model with its tokenizer: scores images against prompts.
pub struct ClipScorer {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    device: Device,
    image_size: usize,
}

impl std::fmt::Debug for ClipScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipScorer")
            .field("device", &self.device)
            .field("image_size", &self.image_size)
            .finish_non_exhaustive()
    }
}

/// The weights of `<dir>/model.safetensors`, read into memory (as the gateway reads its
/// models: no memory map, so no `unsafe`), converted to f32 as the model is built.
fn weights(dir: &Path, device: &Device) -> Result<VarBuilder<'static>, ClipError> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        return Err(ClipError::Io {
            path,
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let tensors = candle(
        "reading model.safetensors",
        candle_core::safetensors::load(&path, device),
    )?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

impl ClipScorer {
    /// Loads the `CLIPModel` folder `dir` onto `device`, in f32. The configuration comes
    /// from `config.json`, absent keys taking transformers' defaults; a config candle's CLIP
    /// cannot run is refused naming the field ([`ClipError::Config`]): `model_type` other than
    /// `clip`, `hidden_act` other than `quick_gelu`, `layer_norm_eps` other than 1e-5,
    /// `num_channels` other than 3, heads that do not divide the hidden size; so is a
    /// `preprocessor_config.json` asking for other preprocessing than [`preprocess`]'s.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ClipError> {
        let config = config::clip_config(dir)?;
        config::check_preprocessor(dir, config.image_size)?;
        let tokenizer = ClipTokenizer::from_folder(dir)?;
        let model = candle(
            "loading model.safetensors",
            ClipModel::new(weights(dir, device)?, &config),
        )?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            image_size: config.image_size,
        })
    }

    /// The side of the square images the vision tower takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The projected text features of `prompt` (transformers' `get_text_features` of its 77
    /// padded ids).
    ///
    /// CLIP pools the text tower at the first end token. candle pools at the largest id
    /// (`argmax`), which picks the first end token of the padded ids only where ties go to the
    /// first index (its CPU kernel, not guaranteed elsewhere). The tower is causal, so the
    /// hidden state at the end token does not depend on what follows it: the ids are cut
    /// right after it, where the end token is the one largest id on every device.
    pub fn text_features(&self, prompt: &str) -> Result<TextFeatures, ClipError> {
        let ids = self.tokenizer.encode(prompt)?;
        let end = self.tokenizer.count(prompt)?.min(ids.len()) - 1;
        let ids = &ids[..=end];
        let eos = ids[end];
        if let Some(&largest) = ids[..end].iter().find(|&&id| id >= eos) {
            return Err(ClipError::EndToken { eos, largest });
        }
        self.text_features_of_ids(ids)
    }

    /// The projected text features of token ids as given (candle's pooling at the largest id).
    pub fn text_features_of_ids(&self, ids: &[u32]) -> Result<TextFeatures, ClipError> {
        let ids = candle(
            "text ids",
            Tensor::new(ids, &self.device).and_then(|t| t.unsqueeze(0)),
        )?;
        let features = candle("text tower", self.model.get_text_features(&ids))?;
        Ok(TextFeatures(candle(
            "text features",
            features.squeeze(0).and_then(|t| t.to_vec1()),
        )?))
    }

    /// The projected image features of CLIP pixel values, `[3, S, S]` with `S` the
    /// [`image_size`](Self::image_size) (already preprocessed: [`preprocess::pixel_values`]).
    pub fn image_features(&self, pixel_values: &[f32]) -> Result<Vec<f32>, ClipError> {
        let s = self.image_size;
        if pixel_values.len() != 3 * s * s {
            return Err(ClipError::Image {
                len: pixel_values.len(),
                height: s,
                width: s,
            });
        }
        let pixels = candle(
            "pixel values",
            Tensor::from_slice(pixel_values, (1, 3, s, s), &self.device),
        )?;
        let features = candle("vision tower", self.model.get_image_features(&pixels))?;
        candle(
            "image features",
            features.squeeze(0).and_then(|t| t.to_vec1()),
        )
    }

    /// The CLIP score of a planar `[3, height, width]` RGB image in [0, 1] against `text`.
    pub fn score_image(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        text: &TextFeatures,
    ) -> Result<f32, ClipError> {
        if height == 0 || width == 0 || image.len() != 3 * height * width {
            return Err(ClipError::Image {
                len: image.len(),
                height,
                width,
            });
        }
        if image.iter().any(|v| !v.is_finite()) {
            return Err(ClipError::NotFinite {
                what: "image values",
            });
        }
        let pixels = preprocess::pixel_values(image, height, width, self.image_size);
        clip_score(&self.image_features(&pixels)?, &text.0)
    }

    /// The CLIP score of a planar `[3, height, width]` RGB image in [0, 1] against `prompt`.
    pub fn score(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        prompt: &str,
    ) -> Result<f32, ClipError> {
        self.score_image(image, height, width, &self.text_features(prompt)?)
    }
}

/// The cosine similarity of two feature vectors (0 where one is all zeros), in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let norms = norm(a) * norm(b);
    if norms == 0.0 { 0.0 } else { dot / norms }
}

/// torchmetrics' CLIP score of image and text features: `100 * max(0, cosine)`, in [0, 100].
/// Features holding NaN or an infinity are refused: `max(0, NaN)` would silently be 0.
pub fn clip_score(image_features: &[f32], text_features: &[f32]) -> Result<f32, ClipError> {
    for (what, values) in [
        ("image features", image_features),
        ("text features", text_features),
    ] {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ClipError::NotFinite { what });
        }
    }
    let cosine = cosine(image_features, text_features);
    if !cosine.is_finite() {
        // Finite features whose squares overflow f64 cannot happen with f32 inputs; kept so
        // the score is never NaN.
        return Err(ClipError::NotFinite {
            what: "image features",
        });
    }
    Ok((100.0 * cosine.max(0.0)) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_a_hundred_times_the_clamped_cosine() {
        let score = |a: &[f32], b: &[f32]| clip_score(a, b).expect("finite features");
        assert_eq!(score(&[1.0, 0.0], &[2.0, 0.0]), 100.0);
        assert_eq!(score(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert_eq!(score(&[1.0, 0.0], &[-1.0, 0.0]), 0.0, "clamped at 0");
        // cos 45 degrees.
        assert!((score(&[1.0, 1.0], &[1.0, 0.0]) - 70.710_68).abs() < 1e-4);
        assert_eq!(score(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn non_finite_features_are_refused_not_scored_zero() {
        // Without the check `max(0, NaN)` made the score 0.
        let what = |a: &[f32], b: &[f32]| match clip_score(a, b) {
            Err(ClipError::NotFinite { what }) => what,
            other => panic!("{other:?}"),
        };
        assert_eq!(what(&[f32::NAN, 0.0], &[1.0, 0.0]), "image features");
        assert_eq!(what(&[1.0, 0.0], &[f32::INFINITY, 0.0]), "text features");
    }
}
