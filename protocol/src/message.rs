//! The two message sets: what a kiosk sends, and what a gateway sends.

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::frame::{Direction, Message, MessageType};
use crate::ids::JobId;
use crate::job_error::JobError;
use crate::limits::Limits;
use crate::load::LoadReport;
use crate::progress::{Queued, StepProgress};
use crate::request::RefineRequest;
use crate::result::RefineResult;
use crate::wire::Reader;

/// A frame a kiosk sends to a gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Opens a job; the first frame of a job stream.
    Refine(RefineRequest),
    /// Asks for a [`LoadReport`]; the only frame of a probe stream.
    LoadProbe,
    /// Cancels the stream's job (closing the stream does too).
    Cancel(JobId),
}

/// A frame a gateway sends to a kiosk.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The job waits in the queue.
    Queued(Queued),
    /// A denoising step finished.
    Progress(StepProgress),
    /// The final image; the last frame of the stream.
    Result(RefineResult),
    /// The answer to a load probe.
    Load(LoadReport),
    /// The job failed or was refused; the last frame of the stream. `job_id` is all zero bytes
    /// when the failure concerns a frame that named no job.
    Error {
        /// The job concerned.
        job_id: JobId,
        /// What happened.
        error: JobError,
    },
}

impl Message for ClientMessage {
    const DIRECTION: Direction = Direction::KioskToGateway;

    fn message_type(&self) -> MessageType {
        match self {
            Self::Refine(_) => MessageType::RefineRequest,
            Self::LoadProbe => MessageType::LoadProbe,
            Self::Cancel(_) => MessageType::Cancel,
        }
    }

    fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        match self {
            Self::Refine(request) => request.validate(limits),
            Self::LoadProbe | Self::Cancel(_) => Ok(()),
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::Refine(request) => request.encode(out),
            Self::LoadProbe => {}
            Self::Cancel(job_id) => out.extend_from_slice(job_id.as_bytes()),
        }
    }

    fn decode_payload(
        kind: MessageType,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(payload);
        let message = match kind {
            MessageType::RefineRequest => Self::Refine(RefineRequest::decode(&mut reader, limits)?),
            MessageType::LoadProbe => Self::LoadProbe,
            MessageType::Cancel => Self::Cancel(JobId::from_bytes(reader.array(Field::JobId)?)),
            other => {
                return Err(DecodeError::WrongDirection {
                    kind: other,
                    expected: Self::DIRECTION,
                });
            }
        };
        reader.finish()?;
        Ok(message)
    }
}

impl Message for ServerMessage {
    const DIRECTION: Direction = Direction::GatewayToKiosk;

    fn message_type(&self) -> MessageType {
        match self {
            Self::Queued(_) => MessageType::Queued,
            Self::Progress(_) => MessageType::StepProgress,
            Self::Result(_) => MessageType::RefineResult,
            Self::Load(_) => MessageType::LoadReport,
            Self::Error { .. } => MessageType::Error,
        }
    }

    fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        match self {
            Self::Progress(progress) => progress.validate(),
            Self::Result(result) => result.validate(limits),
            Self::Error { error, .. } => error.validate(limits),
            Self::Queued(_) | Self::Load(_) => Ok(()),
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::Queued(queued) => queued.encode(out),
            Self::Progress(progress) => progress.encode(out),
            Self::Result(result) => result.encode(out),
            Self::Load(load) => load.encode(out),
            Self::Error { job_id, error } => {
                out.extend_from_slice(job_id.as_bytes());
                error.encode(out);
            }
        }
    }

    fn decode_payload(
        kind: MessageType,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(payload);
        let message = match kind {
            MessageType::Queued => Self::Queued(Queued::decode(&mut reader)?),
            MessageType::StepProgress => Self::Progress(StepProgress::decode(&mut reader)?),
            MessageType::RefineResult => Self::Result(RefineResult::decode(&mut reader, limits)?),
            MessageType::LoadReport => Self::Load(LoadReport::decode(&mut reader)?),
            MessageType::Error => Self::Error {
                job_id: JobId::from_bytes(reader.array(Field::JobId)?),
                error: JobError::decode(&mut reader, limits)?,
            },
            other => {
                return Err(DecodeError::WrongDirection {
                    kind: other,
                    expected: Self::DIRECTION,
                });
            }
        };
        reader.finish()?;
        Ok(message)
    }
}
