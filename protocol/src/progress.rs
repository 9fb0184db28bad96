//! Progress events the gateway streams while a job waits and runs.

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::ids::JobId;
use crate::wire::{Reader, put_u16, put_u32};

/// The job waits in the gateway's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// The job.
    pub job_id: JobId,
    /// Jobs ahead of this one; 0 means it starts next.
    pub position: u32,
    /// The gateway's estimate of the wait before the job starts, in milliseconds.
    pub expected_wait_ms: u32,
}

impl Queued {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.job_id.as_bytes());
        put_u32(out, self.position);
        put_u32(out, self.expected_wait_ms);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            job_id: JobId::from_bytes(reader.array(Field::JobId)?),
            position: reader.u32(Field::Progress)?,
            expected_wait_ms: reader.u32(Field::Progress)?,
        })
    }
}

/// Denoising step `step` of `total` finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// The job.
    pub job_id: JobId,
    /// Steps done, 1..=total.
    pub step: u16,
    /// Steps this job runs.
    pub total: u16,
}

impl StepProgress {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        if self.step == 0 || self.step > self.total {
            return Err(ValidationError::Progress {
                step: self.step,
                total: self.total,
            });
        }
        Ok(())
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.job_id.as_bytes());
        put_u16(out, self.step);
        put_u16(out, self.total);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            job_id: JobId::from_bytes(reader.array(Field::JobId)?),
            step: reader.u16(Field::Progress)?,
            total: reader.u16(Field::Progress)?,
        })
    }
}
