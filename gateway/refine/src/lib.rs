//! The gateway's refinement engine: Stable Diffusion v1.5 img2img from a kiosk's latent, on
//! candle.
//!
//! This crate owns loading a diffusers-format SD 1.x folder (safetensors for the UNet, the VAE and
//! the CLIP text encoder, plus the tokenizer and scheduler config) into candle, and one
//! refinement: re-noise the kiosk's latent to the requested noise level with the job's seed,
//! denoise the remaining steps under the final prompt with classifier-free guidance (the shared
//! loop and schedulers of `diffusionx-diffusion`, so the handover is exact), and decode. It
//! never touches the network or a clock; queueing, batching and serving belong to `gatewayd`.
//! CPU only for now; the `cuda` feature and batching across jobs come with the server.

mod error;
mod model;
mod refine;

pub use error::RefineError;
pub use model::Refiner;
pub use refine::{RefineJob, Refined};
