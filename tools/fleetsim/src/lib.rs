//! The fleet simulator: many virtual kiosks in one process, each a real
//! [`diffusionx_agent::Agent`] with its own state folder, reporting synthetic but plausible
//! sessions to a broker (see `docs/fleetsim.md`).
//!
//! - [`rng`]: a seeded SplitMix64, so a run is reproducible without a dependency;
//! - [`synth`]: the synthetic session reports (pure: the time is an argument);
//! - [`fleet`]: starting the agents, pacing their reports, waiting for empty outboxes, shutting
//!   down cleanly;
//! - [`bench`](mod@bench): the broker benchmark (delivered reports per second, end-to-end latency, losses,
//!   duplicates, memory) and its markdown section;
//! - [`machine`]: the machine a benchmark ran on; [`limits`]: the open-file limit.
//!
//! It never touches the engine, QUIC or ML frameworks: the agent is the whole kiosk here.

pub mod bench;
pub mod fleet;
pub mod limits;
pub mod machine;
pub mod rng;
pub mod synth;

pub use fleet::{FleetConfig, RunSummary};
