//! `gatewayd`: the QUIC server that refines kiosk latents with SD v1.5.
//!
//! Kiosks connect over QUIC with TLS 1.3 and a client certificate from the fleet CA, open one
//! bidirectional stream per job and speak the wire protocol of `diffusionx-protocol`
//! (`docs/protocol.md`). Jobs wait in a bounded queue served round robin across devices, and one
//! engine thread runs them with continuous batching on `diffusionx-refine`. Prometheus metrics
//! and health checks are served over plain HTTP on a separate port.
//!
//! Modules: [`config`] (TOML), [`tls`] (certificates, mTLS, the dev PKI), [`metrics`],
//! [`Scheduler`] (admission, fairness, deadlines, batching; a panic in the refiner fails its
//! jobs, not the engine thread) and [`Gateway`] (the endpoint).

pub mod config;
mod engine;
mod http;
pub mod metrics;
mod queue;
mod scheduler;
mod server;
pub mod tls;

pub use scheduler::Scheduler;
pub use server::{CLOSE_TOO_MANY_CONNECTIONS, CONNECTIONS_PER_DEVICE, Gateway, ShutdownReport};
