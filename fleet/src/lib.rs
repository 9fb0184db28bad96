//! The fleet's MQTT contract, shared by the kiosk's agent, `dxctl` and the fleet simulator.
//!
//! Pure: no I/O, no clock, no MQTT client. Everything a third-party tool needs to talk to a
//! DiffusionX fleet is here and in `docs/mqtt.md`:
//!
//! - [`topic`]: the topic scheme `kiosk/v1/{fleet}/{device}/{leaf}`, built and parsed in one place,
//!   with the QoS and retain flag of each leaf;
//! - [`payload`]: the JSON bodies (presence, birth facts, telemetry, session reports, command
//!   requests and replies, desired and reported configuration);
//! - [`settings`]: the settings an operator may change remotely, validated field by field;
//! - [`histogram`]: latency histograms that merge across kiosks, for fleet-wide percentiles.

pub mod histogram;
pub mod payload;
pub mod settings;
pub mod topic;

pub use histogram::Histogram;
pub use payload::{
    CommandReply, ConfigDesired, ConfigReported, Finalize, Info, LatencySummary, PredictorReport,
    Presence, PresenceState, PromptField, RoundReport, SessionReport, Telemetry,
};
pub use settings::{NoiseLevelMode, NoisePolicy, PromptPrivacy, Settings, SettingsError};
pub use topic::{Command, Leaf, Topic, TopicError};
