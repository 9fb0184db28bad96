//! What can be wrong with a frame: framing errors, and field values outside the limits.

use crate::field::Field;
use crate::frame::{Direction, MessageType};

/// A field holds a value the protocol does not allow. Returned by encoding (we never send what
/// the peer would refuse) and, wrapped in [`DecodeError::Invalid`], by decoding.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A text field is longer than its limit.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TextTooLong {
        /// The field at fault.
        field: Field,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A text field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field at fault.
        field: Field,
    },
    /// A prompt has more CLIP tokens than the text encoder's context.
    #[error("{field} is {count} CLIP tokens, more than the limit of {max}")]
    TooManyTokens {
        /// The field at fault.
        field: Field,
        /// Its token count, start and end tokens included.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A device id is empty, longer than 64 bytes, or has a byte outside `[A-Za-z0-9._-]`.
    #[error("device id {0:?} must be 1 to 64 bytes of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidDeviceId(String),
    /// An image side is outside the limits or not a multiple of 8 pixels.
    #[error("resolution {width}x{height} px: each side must be a multiple of 8 in {min}..={max}")]
    Resolution {
        /// Width in pixels.
        width: u16,
        /// Height in pixels.
        height: u16,
        /// Smallest side allowed.
        min: u16,
        /// Largest side allowed.
        max: u16,
    },
    /// The latent has a channel count other than 4.
    #[error("latent has {0} channels, expected 4")]
    LatentChannels(u8),
    /// The latent's spatial shape does not match the image resolution divided by 8.
    #[error(
        "latent is {latent_height}x{latent_width}, expected {expected_height}x{expected_width} for the resolution"
    )]
    LatentShape {
        /// Latent height.
        latent_height: u16,
        /// Latent width.
        latent_width: u16,
        /// Height the resolution implies.
        expected_height: u16,
        /// Width the resolution implies.
        expected_width: u16,
    },
    /// The latent's value count does not match its shape.
    #[error("latent holds {actual} values, its shape needs {expected}")]
    LatentLength {
        /// Values the shape needs.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// The latent holds a NaN or an infinity.
    #[error("latent value {index} is not finite ({value})")]
    NonFiniteLatent {
        /// Index of the first bad value, in channel-major order.
        index: usize,
        /// The value, widened to f32.
        value: f32,
    },
    /// The dtype code is unknown.
    #[error("unknown latent dtype code {0}")]
    UnknownDtype(u8),
    /// The noise level is outside 1..=10000 basis points.
    #[error("noise level {0} basis points is outside 1..=10000")]
    NoiseLevel(u16),
    /// The noise level and step count leave no denoising step to run.
    #[error("{steps} steps at noise level {noise_level_bp} bp run no denoising step")]
    NoDenoisingSteps {
        /// Total steps.
        steps: u16,
        /// Noise level in basis points.
        noise_level_bp: u16,
    },
    /// The step count is outside 1..=max.
    #[error("step count {value} is outside 1..={max}")]
    Steps {
        /// The value sent.
        value: u16,
        /// The limit.
        max: u16,
    },
    /// The guidance scale is not finite or outside 0..=max.
    #[error("guidance scale {value} is outside 0..={max}")]
    GuidanceScale {
        /// The value sent.
        value: f32,
        /// The limit.
        max: f32,
    },
    /// The scheduler code is unknown.
    #[error("unknown scheduler code {0}")]
    UnknownScheduler(u8),
    /// The image format code is unknown.
    #[error("unknown image format code {0}")]
    UnknownImageFormat(u8),
    /// The JPEG quality is outside 1..=100, or non-zero for PNG.
    #[error("jpeg quality {quality} is not allowed for {format}")]
    JpegQuality {
        /// The format.
        format: &'static str,
        /// The quality sent.
        quality: u8,
    },
    /// A reserved flag bit is set.
    #[error("reserved bits set in flags {0:#04x}")]
    ReservedFlags(u8),
    /// A boolean byte is neither 0 nor 1.
    #[error("{field}: boolean byte {value} is neither 0 nor 1")]
    Bool {
        /// The field at fault.
        field: Field,
        /// The byte sent.
        value: u8,
    },
    /// The deadline is 0 or above the limit.
    #[error("deadline {value} ms is outside 1..={max}")]
    Deadline {
        /// The value sent.
        value: u32,
        /// The limit.
        max: u32,
    },
    /// Step progress is not `1 <= step <= total`.
    #[error("progress step {step} of {total} is out of order")]
    Progress {
        /// Step reported.
        step: u16,
        /// Total reported.
        total: u16,
    },
    /// The encoded image is larger than the limit, or empty.
    #[error("image of {len} bytes is outside 1..={max}")]
    ImageSize {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An error frame has an unknown error code.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u8),
    /// An error frame names an unknown field.
    #[error("unknown field code {0}")]
    UnknownField(u8),
    /// The encoded payload would be larger than the frame limit of its direction.
    #[error("payload of {len} bytes is over the frame limit of {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

impl ValidationError {
    /// The field at fault, for [`JobError::InvalidRequest`](crate::JobError).
    pub fn field(&self) -> Field {
        match self {
            Self::TextTooLong { field, .. }
            | Self::InvalidUtf8 { field }
            | Self::TooManyTokens { field, .. }
            | Self::Bool { field, .. } => *field,
            Self::InvalidDeviceId(_) => Field::DeviceId,
            Self::Resolution { .. } => Field::Resolution,
            Self::LatentChannels(_)
            | Self::LatentShape { .. }
            | Self::LatentLength { .. }
            | Self::NonFiniteLatent { .. }
            | Self::UnknownDtype(_) => Field::Latent,
            Self::NoiseLevel(_) | Self::NoDenoisingSteps { .. } => Field::NoiseLevel,
            Self::Steps { .. } => Field::Steps,
            Self::GuidanceScale { .. } => Field::GuidanceScale,
            Self::UnknownScheduler(_) => Field::Scheduler,
            Self::UnknownImageFormat(_) | Self::JpegQuality { .. } => Field::OutputFormat,
            Self::ReservedFlags(_) => Field::Flags,
            Self::Deadline { .. } => Field::Deadline,
            Self::Progress { .. } => Field::Progress,
            Self::ImageSize { .. } => Field::Image,
            Self::UnknownErrorCode(_) | Self::UnknownField(_) => Field::Error,
            Self::PayloadTooLarge { .. } => Field::Frame,
        }
    }
}

/// A frame could not be decoded. Every variant is an answer about the bytes; the decoder never
/// panics, and "not enough bytes yet" is `Ok(None)`, not an error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame does not start with `DX`.
    #[error("bad magic {0:02x?}: not a DiffusionX frame")]
    BadMagic([u8; 2]),
    /// The frame's version is not one this decoder speaks.
    #[error("protocol version {0} is not supported (this side speaks 1)")]
    UnsupportedVersion(u8),
    /// The message type code is unknown.
    #[error("unknown message type {0:#04x}")]
    UnknownMessageType(u8),
    /// A known message type sent in the wrong direction (a gateway message sent to a gateway).
    #[error("{kind:?} does not travel {expected}")]
    WrongDirection {
        /// The message type received.
        kind: MessageType,
        /// The direction the receiver decodes.
        expected: Direction,
    },
    /// The payload length is over the limit: refused before reading or allocating it.
    #[error("frame payload of {len} bytes is over the limit of {max}")]
    FrameTooLarge {
        /// Declared payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload ended inside a field.
    #[error("frame payload ends inside {0}")]
    Truncated(Field),
    /// The payload has bytes after its last field.
    #[error("{0} bytes after the last field of the payload")]
    TrailingBytes(usize),
    /// A field holds a value outside the protocol's limits.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl DecodeError {
    /// The field at fault, for [`JobError::InvalidRequest`](crate::JobError).
    pub fn field(&self) -> Field {
        match self {
            Self::Truncated(field) => *field,
            Self::Invalid(invalid) => invalid.field(),
            Self::BadMagic(_)
            | Self::UnsupportedVersion(_)
            | Self::UnknownMessageType(_)
            | Self::WrongDirection { .. }
            | Self::FrameTooLarge { .. }
            | Self::TrailingBytes(_) => Field::Frame,
        }
    }
}
