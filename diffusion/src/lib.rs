//! Diffusion math shared by the kiosk and the gateway.
//!
//! This crate owns the numbers both sides must agree on exactly for a handover to be exact: the
//! SD-1.x noise schedule, the timestep spacing of a schedule with `N` steps, the img2img rule that
//! turns a noise level into the timesteps left to run, and re-noising a latent to a timestep. It
//! works on plain `f32` slices and never depends on an ML framework, an async runtime or I/O; the
//! engines (tract on the kiosk, candle on the gateway) call it. Values are checked against
//! diffusers, the reference implementation.

mod noise_level;
mod schedule;
mod timesteps;

pub use noise_level::NoiseLevel;
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use timesteps::{Img2ImgPlan, TimestepSpacing, img2img_plan, timesteps};
