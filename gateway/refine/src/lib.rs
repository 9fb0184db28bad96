//! The gateway's refinement engine: Stable Diffusion v1.5 img2img from a kiosk's latent, on
//! candle.
//!
//! This crate owns loading a diffusers-format SD 1.x folder (safetensors for the UNet, the VAE and
//! the CLIP text encoder, plus the tokenizer and scheduler config) into candle, and one
//! refinement: re-noise the kiosk's latent to the requested noise level with the job's seed,
//! denoise the remaining steps under the final prompt with classifier-free guidance (the shared
//! loop and schedulers of `diffusionx-diffusion`, so the handover is exact), and decode. It
//! never touches the network or a clock; queueing, batching and serving belong to `gatewayd`.
//! Jobs advance one step at a time ([`Refiner::step_batch`]), several per UNet call, each at its
//! own timestep, so the server can batch continuously.

pub mod allocator;
mod attention;
mod blocks;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod fused;
mod model;
mod refine;
mod resnet;
mod unet;
mod vae;

pub use error::RefineError;
pub use model::{Compute, Refiner};
pub use refine::{RefineJob, RefineTask, Refined};
