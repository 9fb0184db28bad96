//! The noise level predictor's labelling tool (issue #7): real training labels from the edge
//! and cloud models.
//!
//! For each prompt and seed it runs the kiosk's preview on the edge pipeline (tract) and
//! computes the predictor's features exactly as the kiosk does ([`preview`]); then it runs the
//! gateway's refinement of that preview (candle) at level 1.0 as the reference and at each
//! level of a grid ([`cloud`], [`levels`]), and scores each result against the reference
//! ([`score`]: PSNR, SSIM, latent RMSE, one of them mapped to the `quality`). Given a CLIP
//! model, it also scores each image against its prompt ([`clip`]: candle-transformers' CLIP,
//! transformers' preprocessing, torchmetrics' CLIP score). [`label`] ties these into the
//! `diffusionx-predictor-tools` dataset lines; [`run`] writes them as each request finishes,
//! skipping and counting a request that fails, and resumes an interrupted run; [`summary`]
//! sums a run up.
//!
//! It owns no diffusion model code: the pipelines are `diffusionx-engine`'s and
//! `diffusionx-refine`'s, the features `diffusionx-predictor`'s, the dataset
//! `diffusionx-predictor-tools`'; the CLIP model is candle-transformers'. It never
//! depends on an async runtime, a network stack or an MQTT client; apart from the model
//! folders read where the models load, only the `dx-label` binary reads and writes files. The design is in `docs/predictor.md`.

pub mod clip;
pub mod cloud;
mod error;
pub mod label;
pub mod levels;
pub mod preview;
pub mod prompts;
pub mod run;
pub mod score;
pub mod summary;

pub use error::LabelError;
