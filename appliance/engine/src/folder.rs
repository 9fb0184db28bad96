//! The model folder: optimum's ONNX layout for a Stable Diffusion pipeline plus our manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::EngineError;

/// The manifest file we add to a model folder.
pub const MANIFEST: &str = "diffusionx.json";

/// The optional fast decoder for previews (a TAESD-style `AutoencoderTiny` decoder, added by
/// `onnx/export.py --tiny-decoder`): `latent_sample` (the UNet's scaled latents) -> `sample`
/// (`[-1, 1]`, 8x the latent's size).
pub const TINY_VAE_DECODER: &str = "tiny_vae_decoder/model.onnx";

/// Files a model folder must have, and what each is for.
const REQUIRED: [(&str, &str); 6] = [
    ("model_index.json", "the pipeline description"),
    ("text_encoder/model.onnx", "the CLIP text encoder"),
    ("unet/model.onnx", "the denoising UNet"),
    ("vae_decoder/model.onnx", "the VAE decoder"),
    ("tokenizer/tokenizer.json", "the CLIP tokenizer"),
    ("scheduler/scheduler_config.json", "the noise schedule"),
];

/// Weight precision of a folder's graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float weights.
    F32,
    /// 8-bit integer weights (dynamic quantization), f32 activations.
    Int8,
}

/// `diffusionx.json`: what the export wrote and checked.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Manifest format version; 1.
    pub format: u32,
    /// Weight precision.
    pub precision: Precision,
    /// SHA-256 (lowercase hex) of every file, by path relative to the folder.
    pub files: BTreeMap<String, String>,
    /// `[height, width]` pairs the export verified.
    #[serde(default)]
    pub checked_resolutions: Vec<[u32; 2]>,
    /// The VAE's latent scaling factor.
    #[serde(default = "default_scaling")]
    pub vae_scaling_factor: f32,
}

fn default_scaling() -> f32 {
    0.18215
}

/// An opened, checked model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    manifest: Manifest,
}

impl ModelFolder {
    /// Opens `root`: every required file must exist and the manifest must list it; with
    /// `verify_hashes`, every listed file's SHA-256 must match (seconds for a full-size model,
    /// worth it after a power loss during an update).
    pub fn open(root: impl Into<PathBuf>, verify_hashes: bool) -> Result<Self, EngineError> {
        let root = root.into();
        let manifest_path = root.join(MANIFEST);
        if !manifest_path.is_file() {
            return Err(EngineError::MissingFile {
                folder: root,
                file: MANIFEST.into(),
                why: "the manifest written by onnx/export.py",
            });
        }
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| EngineError::io(&manifest_path, e))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| EngineError::Manifest {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format != 1 {
            return Err(EngineError::Manifest {
                path: manifest_path,
                reason: format!(
                    "format {} is not supported (this kiosk reads format 1)",
                    manifest.format
                ),
            });
        }
        for (file, why) in REQUIRED {
            if !root.join(file).is_file() {
                return Err(EngineError::MissingFile {
                    folder: root,
                    file: file.into(),
                    why,
                });
            }
            if !manifest.files.contains_key(file) {
                return Err(EngineError::Manifest {
                    path: manifest_path,
                    reason: format!("does not list {file}"),
                });
            }
        }
        // Optional, but never half there: a listed decoder that is gone, or one the manifest does
        // not list (an update interrupted, or a file copied in by hand), is refused.
        match (
            root.join(TINY_VAE_DECODER).is_file(),
            manifest.files.contains_key(TINY_VAE_DECODER),
        ) {
            (false, true) => {
                return Err(EngineError::MissingFile {
                    folder: root,
                    file: TINY_VAE_DECODER.into(),
                    why: "the tiny preview decoder the manifest lists",
                });
            }
            (true, false) => {
                return Err(EngineError::Manifest {
                    path: manifest_path,
                    reason: format!(
                        "does not list {TINY_VAE_DECODER}, which the folder has (add it with \
                         onnx/export.py --tiny-decoder, or remove it)"
                    ),
                });
            }
            _ => {}
        }
        if verify_hashes {
            for (file, expected) in &manifest.files {
                let actual = sha256_file(&root.join(file))?;
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(EngineError::HashMismatch {
                        file: file.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
        }
        Ok(Self { root, manifest })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The path of `file` inside the folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    /// The optional VAE encoder (needed only to start from an image rather than a latent).
    pub fn vae_encoder(&self) -> Option<PathBuf> {
        Some(self.path("vae_encoder/model.onnx")).filter(|p| p.is_file())
    }

    /// The optional tiny VAE decoder for fast previews ([`TINY_VAE_DECODER`]), if the folder
    /// has one.
    pub fn tiny_vae_decoder(&self) -> Option<PathBuf> {
        Some(self.path(TINY_VAE_DECODER)).filter(|p| p.is_file())
    }
}

/// SHA-256 of a file as lowercase hex, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
