//! The frame: an 8-byte header (magic, version, type, payload length) and a payload.

use std::fmt;

use crate::error::{DecodeError, ValidationError};
use crate::limits::Limits;

/// The first two bytes of every frame: ASCII `DX`.
pub const MAGIC: [u8; 2] = *b"DX";
/// The framing version this crate speaks. It equals the digit of the ALPN id.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by a kiosk, decoded by a gateway.
    KioskToGateway,
    /// Sent by a gateway, decoded by a kiosk.
    GatewayToKiosk,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KioskToGateway => "from kiosk to gateway",
            Self::GatewayToKiosk => "from gateway to kiosk",
        })
    }
}

/// The message type byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// [`RefineRequest`](crate::RefineRequest): opens a job stream.
    RefineRequest = 0x01,
    /// Asks for a [`LoadReport`](crate::LoadReport); empty payload.
    LoadProbe = 0x02,
    /// Cancels the job of this stream.
    Cancel = 0x03,
    /// [`Queued`](crate::Queued): the job waits at a queue position.
    Queued = 0x81,
    /// [`StepProgress`](crate::StepProgress): a denoising step finished.
    StepProgress = 0x82,
    /// [`RefineResult`](crate::RefineResult): the final image.
    RefineResult = 0x83,
    /// [`LoadReport`](crate::LoadReport): answer to a load probe.
    LoadReport = 0x84,
    /// [`JobError`](crate::JobError): the job (or frame) was refused or failed.
    Error = 0x85,
}

impl MessageType {
    /// The message type with wire code `code`.
    pub fn from_code(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            0x01 => Self::RefineRequest,
            0x02 => Self::LoadProbe,
            0x03 => Self::Cancel,
            0x81 => Self::Queued,
            0x82 => Self::StepProgress,
            0x83 => Self::RefineResult,
            0x84 => Self::LoadReport,
            0x85 => Self::Error,
            other => return Err(DecodeError::UnknownMessageType(other)),
        })
    }

    /// Which way this type travels: codes below 0x80 go to the gateway.
    pub fn direction(self) -> Direction {
        if (self as u8) < 0x80 {
            Direction::KioskToGateway
        } else {
            Direction::GatewayToKiosk
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The payload's message type.
    pub message_type: MessageType,
    /// The payload's length in bytes, already checked against the limit.
    pub payload_len: u32,
}

impl FrameHeader {
    /// Parses a header from the start of `buf`, checking what is there as soon as it is there
    /// (a bad magic is refused after two bytes). `Ok(None)` asks for more bytes. A transport
    /// reads [`HEADER_LEN`] bytes, calls this, then reads `payload_len` more.
    pub fn parse(
        buf: &[u8],
        expected: Direction,
        limits: &Limits,
    ) -> Result<Option<Self>, DecodeError> {
        if let [a, b, ..] = *buf
            && [a, b] != MAGIC
        {
            return Err(DecodeError::BadMagic([a, b]));
        }
        if let Some(&version) = buf.get(2)
            && version != VERSION
        {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let Some(&code) = buf.get(3) else {
            return Ok(None);
        };
        let kind = MessageType::from_code(code)?;
        if kind.direction() != expected {
            return Err(DecodeError::WrongDirection { kind, expected });
        }
        let Some(len) = buf.get(4..HEADER_LEN) else {
            return Ok(None);
        };
        let payload_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        let max = limits.max_payload(expected);
        if payload_len > max {
            return Err(DecodeError::FrameTooLarge {
                len: payload_len,
                max,
            });
        }
        Ok(Some(Self {
            message_type: kind,
            payload_len,
        }))
    }
}

/// A message of one direction: [`ClientMessage`](crate::ClientMessage) or
/// [`ServerMessage`](crate::ServerMessage).
pub trait Message: Sized {
    /// The direction this message type travels.
    const DIRECTION: Direction;

    /// The header's type byte for this message.
    fn message_type(&self) -> MessageType;

    /// Checks every field against `limits`.
    fn validate(&self, limits: &Limits) -> Result<(), ValidationError>;

    /// Appends the payload (no header). Only called on a validated message.
    fn encode_payload(&self, out: &mut Vec<u8>);

    /// Reads a whole payload of type `kind`; the caller validates the result.
    fn decode_payload(
        kind: MessageType,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Self, DecodeError>;
}

/// Encodes and decodes frames under one set of [`Limits`].
#[derive(Debug, Clone, Default)]
pub struct Codec {
    limits: Limits,
}

impl Codec {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends one whole frame for `message` to `out`. A message outside the limits is refused
    /// (and `out` left as it was): we never send what the peer would reject.
    pub fn encode<M: Message>(
        &self,
        message: &M,
        out: &mut Vec<u8>,
    ) -> Result<(), ValidationError> {
        message.validate(&self.limits)?;
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(message.message_type() as u8);
        out.extend_from_slice(&[0; 4]);
        message.encode_payload(out);
        let len = out.len() - start - HEADER_LEN;
        let max = self.limits.max_payload(M::DIRECTION);
        match u32::try_from(len) {
            Ok(len32) if len32 <= max => {
                out[start + 4..start + HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
                Ok(())
            }
            _ => {
                out.truncate(start);
                Err(ValidationError::PayloadTooLarge { len, max })
            }
        }
    }

    /// Decodes the frame at the start of `buf`. Returns the message and the bytes it used,
    /// `Ok(None)` when `buf` holds only a prefix of a valid frame, or the error that the bytes
    /// already show. Never panics, and never allocates for a field before checking its length.
    pub fn decode<M: Message>(&self, buf: &[u8]) -> Result<Option<(M, usize)>, DecodeError> {
        let Some(header) = FrameHeader::parse(buf, M::DIRECTION, &self.limits)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + header.payload_len as usize;
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let message = M::decode_payload(header.message_type, payload, &self.limits)?;
        message.validate(&self.limits)?;
        Ok(Some((message, total)))
    }
}

impl Limits {
    /// The payload limit for frames travelling `direction`.
    pub fn max_payload(&self, direction: Direction) -> u32 {
        match direction {
            Direction::KioskToGateway => self.max_client_payload,
            Direction::GatewayToKiosk => self.max_server_payload,
        }
    }
}
