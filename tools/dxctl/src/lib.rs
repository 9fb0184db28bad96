//! `dxctl`, the operators' tool for a DiffusionX fleet over MQTT v5: which kiosks are online,
//! the live tail of session reports, fleet statistics, remote configuration and commands.
//!
//! This library owns the operator's side of the contract in `diffusionx-fleet` (`docs/mqtt.md`):
//! each command is a function that takes a connected [`broker::Link`] (or plain data) and
//! returns typed rows, so it is tested against a real broker. It never reads files, the
//! environment or the clock, and never prints: the `dxctl` binary parses arguments, reads
//! files and the clock, prints and chooses exit codes.
//!
//! - [`broker`]: broker URLs, connect options, TLS (rustls with ring), the [`broker::Link`];
//! - [`devices`]: presence, birth facts and telemetry folded into one row per kiosk;
//! - [`sessions`]: the de-duplicated tail of session reports;
//! - [`stats`]: per-device and fleet numbers from telemetry or from saved reports;
//! - [`config`]: desired/reported configuration and local checks;
//! - [`command`]: correlated command requests and replies;
//! - [`table`]: the plain-text tables people read.

pub mod broker;
pub mod command;
pub mod config;
pub mod devices;
pub mod sessions;
pub mod stats;
pub mod table;

pub use broker::{BrokerUrl, ConnectOptions, DxError, Link};
