//! What can go wrong while labelling.

use std::path::PathBuf;

use diffusionx_engine::EngineError;
use diffusionx_predictor::{FeatureError, WeightsError};
use diffusionx_refine::RefineError;

use crate::clip::ClipError;

/// A labelling step that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// The edge pipeline failed.
    #[error("edge preview: {0}")]
    Engine(#[from] EngineError),
    /// The cloud refiner failed.
    #[error("cloud refinement: {0}")]
    Refine(#[from] RefineError),
    /// The preview's measurements do not make features.
    #[error("features: {0}")]
    Features(#[from] FeatureError),
    /// The CLIP model failed.
    #[error("CLIP score: {0}")]
    Clip(#[from] ClipError),
    /// The quality is the CLIP score but no CLIP model was given.
    #[error(
        "the quality is the CLIP score (--score clip) but no CLIP model was given (--clip DIR)"
    )]
    NoClipModel,
    /// The text projection is invalid.
    #[error("projection: {0}")]
    Projection(#[from] WeightsError),
    /// The text projection reads an embedding of another width than the edge text encoder's.
    #[error(
        "the projection's rows have {rows} values, the edge text encoder's pooled embedding \
         has {pooled}"
    )]
    ProjectionWidth {
        /// The length of the projection's rows.
        rows: usize,
        /// The pooled embedding's length.
        pooled: usize,
    },
    /// A noise level of the grid is unusable.
    #[error("level {value}: {reason}")]
    Level {
        /// The level as given.
        value: f32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The grid has no level.
    #[error("no noise level to label")]
    NoLevels,
    /// Every level of the grid runs zero cloud steps.
    #[error("every level runs 0 of the {steps} cloud steps")]
    NoCloudWork {
        /// The cloud schedule's steps.
        steps: u16,
    },
    /// The prompt list holds no prompt.
    #[error("the prompt list holds no prompt (blank lines and # comments are skipped)")]
    NoPrompts,
    /// An image or latent to score holds NaN or an infinity (e.g. a cloud model that
    /// overflowed in half precision): it cannot be scored, and the request gets no labels.
    #[error("cannot score {what}: they hold {value}")]
    NotFinite {
        /// Images or latents.
        what: &'static str,
        /// The first value that is not finite.
        value: f32,
    },
    /// Two images or latents to compare differ in shape, or are empty.
    #[error("cannot compare {what}: {reason}")]
    Compare {
        /// Images or latents.
        what: &'static str,
        /// The shapes.
        reason: String,
    },
    /// A file of the run could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An interrupted run's labels are in the way of a fresh run.
    #[error(
        "{} holds the labels of an interrupted run: pass --resume to continue it, or remove it",
        path.display()
    )]
    PartialExists {
        /// The partial dataset.
        path: PathBuf,
    },
    /// The files of the run to resume do not agree or are not what this tool writes.
    #[error("cannot resume from {}: {reason}", path.display())]
    Resume {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
