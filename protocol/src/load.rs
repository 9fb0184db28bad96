//! The gateway's answer to a load probe, cheap enough to ask before every finalize.

use crate::error::DecodeError;
use crate::field::Field;
use crate::wire::{Reader, put_u16, put_u32};

/// How busy the gateway is right now. The predictor turns this into an expected cloud latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Jobs admitted and waiting.
    pub queue_depth: u32,
    /// Jobs in the running batch.
    pub running: u32,
    /// Largest batch the gateway runs.
    pub max_batch: u16,
    /// Estimated wait, in milliseconds, before a job sent now would start.
    pub expected_wait_ms: u32,
    /// Recent mean time of one denoising step of one job, in milliseconds.
    pub step_ms: u32,
    /// False when a job sent now would be answered `Busy` or `ShuttingDown`.
    pub accepting: bool,
}

impl LoadReport {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.queue_depth);
        put_u32(out, self.running);
        put_u16(out, self.max_batch);
        put_u32(out, self.expected_wait_ms);
        put_u32(out, self.step_ms);
        out.push(u8::from(self.accepting));
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            queue_depth: reader.u32(Field::Load)?,
            running: reader.u32(Field::Load)?,
            max_batch: reader.u16(Field::Load)?,
            expected_wait_ms: reader.u32(Field::Load)?,
            step_ms: reader.u32(Field::Load)?,
            accepting: reader.bool(Field::Load)?,
        })
    }
}
