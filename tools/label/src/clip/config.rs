//! A Hugging Face `CLIPModel` folder's `config.json` (and `preprocessor_config.json`, when
//! present) as candle's CLIP configuration, refusing what candle's model or our preprocessing
//! does not implement.

use std::path::{Path, PathBuf};

use candle_transformers::models::clip::ClipConfig;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use serde_json::Value;

use super::ClipError;
use super::preprocess::{CLIP_MEAN, CLIP_STD};

/// candle's CLIP layers normalize with this epsilon, whatever the config says.
const LAYER_NORM_EPS: f64 = 1e-5;
/// PIL's (and transformers') code for bicubic resampling.
const BICUBIC: u64 = 3;

/// Reads and parses a JSON file.
fn read_json(path: &Path) -> Result<Value, ClipError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClipError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ClipError::Config {
        path: path.into(),
        field: "(file)".into(),
        reason: format!("not JSON: {e}"),
    })
}

/// One section of a config file (the file itself, `text_config` or `vision_config`), whose
/// absent keys take transformers' defaults.
struct Section<'a> {
    path: &'a Path,
    prefix: &'static str,
    values: &'a Value,
}

impl Section<'_> {
    fn error(&self, key: &str, reason: String) -> ClipError {
        ClipError::Config {
            path: self.path.to_path_buf(),
            field: format!("{}{key}", self.prefix),
            reason,
        }
    }

    /// A positive integer; `default` when absent (transformers' default for the key).
    fn count(&self, key: &str, default: usize) -> Result<usize, ClipError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.error(key, format!("{v} is not a positive integer"))),
        }
    }

    /// Checks that `key` is absent or `expected` (what candle implements).
    fn require_str(&self, key: &str, expected: &str) -> Result<(), ClipError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) if s == expected => Ok(()),
            Some(v) => Err(self.error(key, format!("{v} is not supported (only {expected:?})"))),
        }
    }

    /// Checks that `key` is absent or within 1e-12 of `expected`.
    fn require_f64(&self, key: &str, expected: f64) -> Result<(), ClipError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v.as_f64().is_some_and(|x| (x - expected).abs() < 1e-12) => Ok(()),
            Some(v) => Err(self.error(key, format!("{v} is not supported (only {expected})"))),
        }
    }

    fn section<'b>(&'b self, key: &'static str, prefix: &'static str) -> Section<'b> {
        static EMPTY: Value = Value::Null;
        Section {
            path: self.path,
            prefix,
            values: self.values.get(key).unwrap_or(&EMPTY),
        }
    }

    /// The checks both towers share: quick GELU, candle's layer norm epsilon, whole heads.
    fn check_tower(&self, hidden: usize, heads: usize) -> Result<(), ClipError> {
        self.require_str("hidden_act", "quick_gelu")?;
        self.require_f64("layer_norm_eps", LAYER_NORM_EPS)?;
        if !hidden.is_multiple_of(heads) {
            return Err(self.error(
                "num_attention_heads",
                format!("{heads} heads do not divide hidden_size {hidden}"),
            ));
        }
        Ok(())
    }
}

/// The model's configuration: candle's, built from `<dir>/config.json` with transformers'
/// defaults for absent keys (`CLIPConfig`, `CLIPTextConfig`, `CLIPVisionConfig`). Refuses,
/// naming the field: another `model_type` than `clip`, an activation other than `quick_gelu`,
/// a layer norm epsilon other than 1e-5 (candle's are fixed), other than 3 image channels, a
/// head count that does not divide the hidden size.
pub(super) fn clip_config(dir: &Path) -> Result<ClipConfig, ClipError> {
    let path: PathBuf = dir.join("config.json");
    let values = read_json(&path)?;
    let top = Section {
        path: &path,
        prefix: "",
        values: &values,
    };
    top.require_str("model_type", "clip")?;
    let projection_dim = top.count("projection_dim", 512)?;
    let logit_scale_init_value = match values.get("logit_scale_init_value") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| top.error("logit_scale_init_value", format!("{v} is not a number")))?
            as f32,
        None => 2.6592,
    };

    let text = top.section("text_config", "text_config.");
    let text_config = ClipTextConfig {
        vocab_size: text.count("vocab_size", 49408)?,
        embed_dim: text.count("hidden_size", 512)?,
        activation: Activation::QuickGelu,
        intermediate_size: text.count("intermediate_size", 2048)?,
        max_position_embeddings: text.count("max_position_embeddings", 77)?,
        pad_with: None,
        num_hidden_layers: text.count("num_hidden_layers", 12)?,
        num_attention_heads: text.count("num_attention_heads", 8)?,
        projection_dim,
    };
    text.check_tower(text_config.embed_dim, text_config.num_attention_heads)?;
    if text_config.max_position_embeddings < diffusionx_text::CONTEXT {
        return Err(text.error(
            "max_position_embeddings",
            format!(
                "{} positions cannot hold the tokenizer's {} ids",
                text_config.max_position_embeddings,
                diffusionx_text::CONTEXT
            ),
        ));
    }

    let vision = top.section("vision_config", "vision_config.");
    let vision_config = ClipVisionConfig {
        embed_dim: vision.count("hidden_size", 768)?,
        activation: Activation::QuickGelu,
        intermediate_size: vision.count("intermediate_size", 3072)?,
        num_hidden_layers: vision.count("num_hidden_layers", 12)?,
        num_attention_heads: vision.count("num_attention_heads", 12)?,
        projection_dim,
        num_channels: vision.count("num_channels", 3)?,
        image_size: vision.count("image_size", 224)?,
        patch_size: vision.count("patch_size", 32)?,
    };
    vision.check_tower(vision_config.embed_dim, vision_config.num_attention_heads)?;
    if vision_config.num_channels != 3 {
        return Err(vision.error(
            "num_channels",
            format!(
                "{} is not supported (RGB only: 3)",
                vision_config.num_channels
            ),
        ));
    }
    if vision_config.patch_size > vision_config.image_size {
        return Err(vision.error(
            "patch_size",
            format!(
                "{} is larger than image_size {}",
                vision_config.patch_size, vision_config.image_size
            ),
        ));
    }
    let image_size = vision_config.image_size;
    Ok(ClipConfig {
        text_config,
        vision_config,
        logit_scale_init_value,
        image_size,
    })
}

/// Checks `<dir>/preprocessor_config.json`, when the folder has one, against the
/// preprocessing we implement ([`super::preprocess`]) for `image_size`: bicubic resize of the
/// shortest side to `image_size`, centre crop of `image_size`, OpenAI's mean and standard
/// deviation. A folder without the file is taken to use those defaults.
pub(super) fn check_preprocessor(dir: &Path, image_size: usize) -> Result<(), ClipError> {
    let path = dir.join("preprocessor_config.json");
    if !path.exists() {
        return Ok(());
    }
    let values = read_json(&path)?;
    let top = Section {
        path: &path,
        prefix: "",
        values: &values,
    };
    let is_true = |key: &str| -> Result<(), ClipError> {
        match values.get(key) {
            None | Some(Value::Bool(true)) => Ok(()),
            Some(v) => Err(top.error(key, format!("{v} is not supported (only true)"))),
        }
    };
    for key in [
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "do_normalize",
        "do_convert_rgb",
    ] {
        is_true(key)?;
    }
    // Our images are already in [0, 1]: the 8-bit rescale must be the usual 1/255.
    top.require_f64("rescale_factor", 1.0 / 255.0)?;
    match values.get("resample") {
        None => {}
        Some(v) if v.as_u64() == Some(BICUBIC) => {}
        Some(v) => {
            return Err(top.error(
                "resample",
                format!("{v} is not supported (only 3, bicubic)"),
            ));
        }
    }
    // `size` is an int (older files) or {"shortest_edge": n}; `crop_size` an int or
    // {"height": n, "width": n}.
    let size = |v: &Value, keys: &[&str]| -> bool {
        v.as_u64().map_or_else(
            || {
                keys.iter()
                    .all(|k| v.get(*k).and_then(Value::as_u64) == Some(image_size as u64))
            },
            |n| n == image_size as u64,
        )
    };
    for (key, keys) in [
        ("size", &["shortest_edge"][..]),
        ("crop_size", &["height", "width"][..]),
    ] {
        if let Some(v) = values.get(key)
            && !size(v, keys)
        {
            return Err(top.error(
                key,
                format!("{v} is not supported (only the model's image_size, {image_size})"),
            ));
        }
    }
    for (key, expected) in [("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)] {
        let Some(v) = values.get(key) else { continue };
        let given: Option<Vec<f64>> = v
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect());
        let same = given.is_some_and(|g| {
            g.len() == 3 && g.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-7)
        });
        if !same {
            return Err(top.error(
                key,
                format!("{v} is not supported (only OpenAI CLIP's {expected:?})"),
            ));
        }
    }
    Ok(())
}
