//! The engine's one error type: what went wrong loading a model folder or running it.

use std::path::PathBuf;

/// Why the engine could not load or run a model. Cancellation is not an error: it is
/// [`Outcome::Cancelled`](crate::Outcome).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file the model folder needs is not there.
    #[error("model folder {folder}: missing {file} ({why})")]
    MissingFile {
        /// The folder.
        folder: PathBuf,
        /// The file, relative to the folder.
        file: String,
        /// What the file is for.
        why: &'static str,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest (`diffusionx.json`) is malformed or does not describe the folder.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file's SHA-256 differs from the manifest's.
    #[error("{file}: SHA-256 is {actual}, the manifest says {expected} (corrupt or replaced file)")]
    HashMismatch {
        /// The file, relative to the folder.
        file: String,
        /// The manifest's hash.
        expected: String,
        /// The file's hash.
        actual: String,
    },
    /// A JSON config file of the folder does not parse or holds unsupported values.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] diffusionx_text::TokenizerError),
    /// tract failed to load, optimize or run a graph.
    #[error("{graph}: {stage}: {source}")]
    Tract {
        /// The graph (`unet`, `text_encoder`, ...).
        graph: &'static str,
        /// What was being done.
        stage: &'static str,
        /// tract's error, with its context chain.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A graph's inputs or outputs do not have the names, types or shapes the pipeline needs.
    #[error("{graph}: {reason}")]
    Graph {
        /// The graph.
        graph: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A request the pipeline cannot run (resolution, steps, tensor sizes).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A `.npy` file is malformed or of an unsupported type.
    #[error("{path}: not a supported .npy file: {reason}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl EngineError {
    pub(crate) fn tract(
        graph: &'static str,
        stage: &'static str,
        error: tract_onnx::prelude::TractError,
    ) -> Self {
        Self::Tract {
            graph,
            stage,
            source: error.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
