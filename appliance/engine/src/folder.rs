//! The model folder: optimum's ONNX layout for a Stable Diffusion pipeline plus our manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::EngineError;

/// The manifest file we add to a model folder.
pub const MANIFEST: &str = "diffusionx.json";

/// The optional fast decoder for previews (a TAESD-style `AutoencoderTiny` decoder, added by
/// `onnx/export.py --tiny-decoder`): `latent_sample` (the UNet's scaled latents) -> `sample`
/// (`[-1, 1]`, 8x the latent's size).
pub const TINY_VAE_DECODER: &str = "tiny_vae_decoder/model.onnx";

/// The tokenizer's configuration: optional (SD 1.x's pad token when absent), but its pad token
/// changes every embedding, so a folder that has it must list it.
pub const TOKENIZER_CONFIG: &str = "tokenizer/tokenizer_config.json";

/// Optional files the engine reads, each never half there: a listed file that is gone, or a
/// file the manifest does not list (an update interrupted, a file copied in by hand), is
/// refused. With what each is for and how to list it.
const OPTIONAL: [(&str, &str, &str); 2] = [
    (
        TINY_VAE_DECODER,
        "the tiny preview decoder the manifest lists",
        "add it with onnx/export.py --tiny-decoder, or remove it",
    ),
    (
        TOKENIZER_CONFIG,
        "the tokenizer configuration the manifest lists",
        "its pad token changes every embedding: re-export the folder, or remove it",
    ),
];

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
///
/// Format 1 is the only one there has been, and `onnx/export.py` has always written
/// `vae_scaling_factor` in it, so the key is required: there is no older manifest a default
/// would have to serve, and a folder without it is not one the export wrote.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Manifest format version; 1.
    pub format: u32,
    /// Weight precision.
    pub precision: Precision,
    /// SHA-256 (lowercase hex) of every file, by path relative to the folder: relative paths
    /// inside it (no `..`, not absolute) of regular files.
    pub files: BTreeMap<String, String>,
    /// `[height, width]` pairs the export verified; when not empty, [`Pipeline::prepare`]
    /// (the kiosk's start-up) refuses other sizes.
    ///
    /// [`Pipeline::prepare`]: crate::Pipeline::prepare
    #[serde(default)]
    pub checked_resolutions: Vec<[u32; 2]>,
    /// The VAE's latent scaling factor (the decoder divides the latent by it): finite and
    /// greater than 0.
    pub vae_scaling_factor: f32,
}

/// An opened, checked model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    manifest: Manifest,
}

impl ModelFolder {
    /// Opens `root`: every required file must exist and the manifest must list it, the optional
    /// ones the engine reads must be both there and listed or neither, every listed path must
    /// stay inside the folder, and `vae_scaling_factor` must be a positive number; with
    /// `verify_hashes`, every listed file must be a regular file whose SHA-256 matches (seconds
    /// for a full-size model, worth it after a power loss during an update).
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
        let scale = manifest.vae_scaling_factor;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(EngineError::Manifest {
                path: manifest_path,
                reason: format!("vae_scaling_factor is {scale}, expected a number above 0"),
            });
        }
        // `root.join` of an absolute path is that path, and `..` leaves the folder.
        if let Some(file) = manifest.files.keys().find(|file| !inside(file)) {
            return Err(EngineError::Manifest {
                path: manifest_path,
                reason: format!("lists {file:?}, which is not a relative path inside the folder"),
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
        for (file, why, hint) in OPTIONAL {
            match (root.join(file).is_file(), manifest.files.contains_key(file)) {
                (false, true) => {
                    return Err(EngineError::MissingFile {
                        folder: root,
                        file: file.into(),
                        why,
                    });
                }
                (true, false) => {
                    return Err(EngineError::Manifest {
                        path: manifest_path,
                        reason: format!("does not list {file}, which the folder has ({hint})"),
                    });
                }
                _ => {}
            }
        }
        if verify_hashes {
            for (file, expected) in &manifest.files {
                let path = root.join(file);
                let Some(opened) = open_regular(&path)? else {
                    // A device (`/dev/zero` would be read forever), a directory, a pipe.
                    return Err(EngineError::Manifest {
                        path: manifest_path,
                        reason: format!("lists {file}, which is not a regular file"),
                    });
                };
                let actual = sha256_read(&path, opened)?;
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

    /// Whether the export verified `height` x `width` px: listed in the manifest's
    /// `checked_resolutions`, or that list is empty (the manifest does not say).
    pub fn checked(&self, height: usize, width: usize) -> bool {
        let list = &self.manifest.checked_resolutions;
        list.is_empty()
            || list
                .iter()
                .any(|&[h, w]| (h as usize, w as usize) == (height, width))
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

/// Whether a manifest key names a path inside the folder: relative, only plain names (no
/// `..`, no `.`, no root or drive prefix).
fn inside(file: &str) -> bool {
    let path = Path::new(file);
    !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Opens `path` if it is a regular file (a link to one included): checked before opening (so a
/// pipe does not block the open) and again on the opened file (it may have been replaced).
fn open_regular(path: &Path) -> Result<Option<std::fs::File>, EngineError> {
    let io = |e| EngineError::io(path, e);
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Ok(None);
    }
    let file = std::fs::File::open(path).map_err(io)?;
    Ok(file.metadata().map_err(io)?.is_file().then_some(file))
}

/// SHA-256 of a file as lowercase hex, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    sha256_read(path, file)
}

/// SHA-256 of an opened file (`path` is for errors).
fn sha256_read(path: &Path, mut file: std::fs::File) -> Result<String, EngineError> {
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
