//! The noise level predictor: how much of the edge preview the cloud redoes.
//!
//! When the visitor finalizes, the cloud re-noises the kiosk's preview latent to a level `s`
//! in (0, 1] and runs `floor(N * s)` steps of an `N`-step SD v1.5 schedule. Too low keeps the
//! small model's flaws; too high makes the visitor wait and spends GPU time on work the
//! preview already did. This crate chooses `s` per request:
//!
//! - [`features`]: what the kiosk has for free at finalize ([`Features`]), the helpers that
//!   compute them from plain `f32` data ([`latent_stats`], [`x0_change`], [`cosine`],
//!   [`Projection`]) and the fixed-order model input ([`Features::to_vector`], features v1);
//! - [`context`]: the measured state of the cloud and the link ([`Context`]) and the
//!   operator's [`Policy`] (quality target, cloud budget, level bounds);
//! - [`observe`]: from the kiosk's raw measurements ([`Observation`], [`X0History`]) to
//!   [`Features`], and the standard text projection;
//! - [`cost`]: the expected end-to-end latency of a level;
//! - [`mlp`] and [`weights`]: a small MLP predicting the quality curve `q(s)` on a grid of
//!   levels, monotone in `s` by construction, with its versioned JSON weights file;
//! - [`rule`]: the documented rule-based default used without a trained model;
//! - [`policy`]: [`Predictor::decide`]: the smallest level meeting the quality target,
//!   lowered to fit the budget, within the bounds, as an exact step count ([`Decision`]).
//!
//! Pure: no I/O, no clock, no async runtime, no ML framework; the kiosk passes in what it
//! measured and reads the file itself. Training, labelling and evaluation live in `tools/`.
//! The design is documented in `docs/predictor.md`.

pub mod context;
pub mod cost;
mod curve;
mod error;
pub mod features;
pub mod mlp;
pub mod observe;
pub mod policy;
pub mod rule;
mod stats;
pub mod weights;

pub use context::{Context, LEVEL_BP, Policy};
pub use cost::{Latency, cloud_steps, expected_latency, level_bp_for_steps, max_steps_within};
pub use curve::QualityCurve;
pub use error::{FeatureError, InputError, WeightsError};
pub use features::{FEATURE_NAMES, FEATURES_VERSION, Features, INPUT_LEN, Projection, TEXT_DIMS};
pub use mlp::{Activation, Layer, monotone_head};
pub use observe::{Observation, X0History};
pub use policy::{Decision, Limit, Predictor, Source};
pub use stats::{LatentStats, X0_WINDOW, cosine, latent_stats, x0_change};
pub use weights::{FORMAT, FORMAT_VERSION, Weights};
