//! The kiosk's fleet agent: the MQTT side of a kiosk (see `docs/mqtt.md`).
//!
//! - [`outbox`]: session reports on disk before any publish, removed only after the broker's
//!   PUBACK, replayed in order after reconnects and reboots;
//! - [`agent`]: the MQTT v5 session (persistent, last will with the boot counter), presence,
//!   birth facts, telemetry, commands and desired configuration;
//! - [`config`]: the `[mqtt]` configuration section; [`state`]: the boot counter and the
//!   operators' settings on disk; [`stats`]: telemetry's rolling window; [`system`]: machine
//!   facts from `/proc` and `/sys`.
//!
//! The topic scheme and payloads are the pure `diffusionx-fleet` crate's.

pub mod agent;
pub mod config;
pub mod outbox;
pub mod state;
pub mod stats;
pub mod system;

pub use agent::{
    Agent, AgentError, AgentEvent, AgentOptions, AgentStatus, Facts, NO_RESTART, predictor_weights,
};
pub use config::MqttConfig;
