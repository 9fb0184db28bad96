//! The wire protocol between a kiosk and the refinement gateway.
//!
//! This crate owns the bytes: typed messages, the versioned binary framing, the limits every
//! field is checked against, and a decoder that never panics on any input. It is sans-IO: it
//! never touches a socket, a clock, a file or an async runtime (no tokio, no quinn), so the
//! kiosk, the gateway, fuzzers and third-party clients can all use it. The normative
//! description, with byte layouts and worked examples, is `docs/protocol.md`; the golden
//! frames in that document are checked against this crate by its tests.
//!
//! Transport (QUIC, TLS 1.3, ALPN [`ALPN`], one bidirectional stream per refinement job) is
//! the business of the binaries; this crate only says what travels on a stream.
//!
//! ```
//! use diffusionx_protocol::{ClientMessage, Codec};
//!
//! let codec = Codec::default();
//! let mut frame = Vec::new();
//! codec.encode(&ClientMessage::LoadProbe, &mut frame)?;
//! assert_eq!(frame, [0x44, 0x58, 0x01, 0x02, 0, 0, 0, 0]);
//! // A strict prefix is "need more bytes", never an error.
//! assert!(codec.decode::<ClientMessage>(&frame[..5])?.is_none());
//! let (message, used) = codec.decode::<ClientMessage>(&frame)?.expect("a whole frame");
//! assert_eq!((message, used), (ClientMessage::LoadProbe, 8));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod field;
mod frame;
mod ids;
mod job_error;
mod latent;
mod limits;
mod load;
mod message;
mod progress;
mod request;
mod result;
mod wire;

pub use diffusionx_diffusion::NoiseLevel;
pub use error::{DecodeError, ValidationError};
pub use field::Field;
pub use frame::{Codec, Direction, FrameHeader, HEADER_LEN, MAGIC, Message, MessageType, VERSION};
pub use ids::{DeviceId, JobId, SessionId};
pub use job_error::JobError;
pub use latent::{Dtype, Latent, LatentData, LatentShape};
pub use limits::{LATENT_CHANNELS, Limits, VAE_SCALE};
pub use load::LoadReport;
pub use message::{ClientMessage, ServerMessage};
pub use progress::{Queued, StepProgress};
pub use request::{ImageFormat, OutputFormat, RefineRequest, Resolution, Scheduler};
pub use result::{EncodedImage, PhaseTimings, RefineResult};

/// The ALPN protocol id a kiosk and a gateway negotiate in the TLS 1.3 handshake. The digit is
/// the protocol's major version; a peer that speaks no common id fails the handshake.
pub const ALPN: &[u8] = b"diffusionx/1";
