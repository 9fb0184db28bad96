//! Training and evaluation of the noise level predictor (`diffusionx-predictor`), issue #7.
//!
//! - [`dataset`]: the labelled JSONL dataset (one line per request and level) and its
//!   grouping into requests with a measured quality curve;
//! - [`synthetic`]: a dataset drawn from a known quality function, so learning can be checked;
//! - [`net`] and [`train`]: the crate's MLP and monotone head in `f64` with hand-written
//!   backpropagation, trained with Adam on mini-batches, early-stopped on a validation split
//!   by prompt id, written as the crate's [`diffusionx_predictor::Weights`];
//! - [`sessions`]: labels from the fleet's session reports (a thumbs verdict at the level the
//!   cloud ran), filtered by projection, de-duplicated, every skipped line counted;
//! - [`evaluate`], [`plot`] and [`setting`]: the learned and rule-based policies against fixed
//!   levels (mean cloud steps, expected latency, share meeting the quality target), as a
//!   markdown table and a PNG with axis titles, tick values and a legend.
//!
//! Pure apart from the binaries (`dx-synthetic`, `dx-train`, `dx-evaluate`), which read and
//! write the files. No ML framework: the network is 17-32-32-10, and a few hundred lines of
//! plain Rust train it in seconds, where candle would take many minutes to compile. It never
//! depends on an async runtime, a network stack or an inference engine. Labels from real
//! models come from the `label` tool (`tools/label`, `docs/predictor.md`).

pub mod dataset;
pub mod evaluate;
pub mod net;
pub mod output;
pub mod plot;
pub mod rng;
pub mod sessions;
pub mod setting;
pub mod synthetic;
pub mod train;
