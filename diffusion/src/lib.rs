//! Diffusion math shared by the kiosk and the gateway.
//!
//! This crate owns the numbers both sides must agree on exactly for a handover to be exact: the
//! SD-1.x noise schedule, the timestep spacing of a schedule with `N` steps, the img2img rule that
//! turns a noise level into the timesteps left to run, re-noising a latent to a timestep, the
//! samplers that run the denoising loop ([`Scheduler`]: DDIM, Euler, DPM-Solver++ 2M, LCM,
//! configured from a diffusers `scheduler_config.json`), and the seeded Gaussian noise
//! ([`gaussian_noise`]) that makes a seed mean the same latent on every machine.
//!
//! It works on plain `f32` slices and never depends on an ML framework, an async runtime or I/O
//! (it parses JSON text it is given, but never reads a file); the engines (tract on the kiosk,
//! candle on the gateway) call it. Values are checked against diffusers, the reference
//! implementation: `diffusion/reference/make_reference.py` writes the fixtures the tests replay.

mod config;
mod denoise;
mod error;
mod noise;
mod noise_level;
mod schedule;
mod scheduler;
mod timesteps;

pub use config::{PredictionType, SchedulerConfig};
pub use denoise::{Denoised, StepReport, denoise, guide};
pub use error::SchedulerError;
pub use noise::{
    STREAM_INITIAL, STREAM_LCM_STEP_BASE, STREAM_RENOISE, gaussian_noise, lcm_step_stream,
};
pub use noise_level::NoiseLevel;
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use scheduler::{Scheduler, SchedulerKind, StepOutput};
pub use timesteps::{Img2ImgPlan, TimestepSpacing, img2img_plan, timesteps};
