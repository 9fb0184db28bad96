//! What can go wrong loading a model folder or refining a job.

use std::path::PathBuf;

/// Why the refiner could not load or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefineError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A config file does not parse or holds unsupported values.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] diffusionx_text::TokenizerError),
    /// candle failed while loading `part`.
    #[error("loading {part}: {source}")]
    Load {
        /// `unet`, `vae` or `text_encoder`.
        part: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// candle failed while running.
    #[error("running the {stage}: {source}")]
    Run {
        /// What was running.
        stage: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// CUDA was asked for and is not available.
    #[error("CUDA: {0}")]
    NoCuda(String),
    /// The job cannot run (sizes, steps).
    #[error("invalid job: {0}")]
    InvalidJob(String),
}

impl RefineError {
    pub(crate) fn run(stage: &'static str) -> impl Fn(candle_core::Error) -> Self {
        move |source| Self::Run { stage, source }
    }
}
