//! The typed refusals and failures a gateway sends instead of a result.

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::limits::Limits;
use crate::wire::{Reader, check_text_len, put_text, put_u32};

/// Why a job (or a frame) got no result. Sent in an `Error` frame; the stream ends after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The queue is full: try again after `retry_after_ms` (or refine locally).
    Busy {
        /// Suggested wait before a retry, in milliseconds.
        retry_after_ms: u32,
    },
    /// A field of the request is invalid; `field` names it.
    InvalidRequest {
        /// The field at fault.
        field: Field,
        /// What is wrong, for logs and operators.
        message: String,
    },
    /// The device is not allowed to send jobs (certificate and device id disagree, or revoked).
    Unauthorized {
        /// What is wrong.
        message: String,
    },
    /// The gateway failed; the request itself was fine.
    Internal {
        /// What failed.
        message: String,
    },
    /// The job was cancelled (by the kiosk, or by an operator).
    Cancelled,
    /// The job's deadline passed before it finished.
    DeadlineExceeded,
    /// The gateway is shutting down and takes no new work.
    ShuttingDown {
        /// Suggested wait before a retry (with another gateway), in milliseconds.
        retry_after_ms: u32,
    },
    /// The frame's version is not spoken here.
    UnsupportedVersion {
        /// The highest version this gateway speaks.
        supported: u8,
    },
}

impl JobError {
    /// The wire code of this error.
    pub fn code(&self) -> u8 {
        match self {
            Self::Busy { .. } => 1,
            Self::InvalidRequest { .. } => 2,
            Self::Unauthorized { .. } => 3,
            Self::Internal { .. } => 4,
            Self::Cancelled => 5,
            Self::DeadlineExceeded => 6,
            Self::ShuttingDown { .. } => 7,
            Self::UnsupportedVersion { .. } => 8,
        }
    }

    /// The answer to a frame that failed to decode: the error names the field at fault.
    pub fn from_decode(error: &DecodeError) -> Self {
        match error {
            DecodeError::UnsupportedVersion(_) => Self::UnsupportedVersion {
                supported: crate::VERSION,
            },
            other => Self::InvalidRequest {
                field: other.field(),
                message: other.to_string(),
            },
        }
    }

    fn message(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { message, .. }
            | Self::Unauthorized { message }
            | Self::Internal { message } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        match self.message() {
            Some(message) => check_text_len(Field::Error, message.len(), limits.max_message_bytes),
            None => Ok(()),
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.code());
        match self {
            Self::Busy { retry_after_ms } | Self::ShuttingDown { retry_after_ms } => {
                put_u32(out, *retry_after_ms);
            }
            Self::InvalidRequest { field, message } => {
                out.push(field.code());
                put_text(out, message);
            }
            Self::Unauthorized { message } | Self::Internal { message } => put_text(out, message),
            Self::UnsupportedVersion { supported } => out.push(*supported),
            Self::Cancelled | Self::DeadlineExceeded => {}
        }
    }

    pub(crate) fn decode(reader: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let max = limits.max_message_bytes;
        Ok(match reader.u8(Field::Error)? {
            1 => Self::Busy {
                retry_after_ms: reader.u32(Field::Error)?,
            },
            2 => {
                let code = reader.u8(Field::Error)?;
                let field = Field::from_code(code).ok_or(ValidationError::UnknownField(code))?;
                Self::InvalidRequest {
                    field,
                    message: reader.text(Field::Error, max)?,
                }
            }
            3 => Self::Unauthorized {
                message: reader.text(Field::Error, max)?,
            },
            4 => Self::Internal {
                message: reader.text(Field::Error, max)?,
            },
            5 => Self::Cancelled,
            6 => Self::DeadlineExceeded,
            7 => Self::ShuttingDown {
                retry_after_ms: reader.u32(Field::Error)?,
            },
            8 => Self::UnsupportedVersion {
                supported: reader.u8(Field::Error)?,
            },
            other => return Err(ValidationError::UnknownErrorCode(other).into()),
        })
    }
}
