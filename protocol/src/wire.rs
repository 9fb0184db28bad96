//! Bounds-checked little-endian reading and writing of primitive fields.

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;

/// Reads fields from one frame's payload. Every read checks the remaining length first, so a
/// short payload is a [`DecodeError::Truncated`] naming the field, never a panic.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Self {
        Self { rest: payload }
    }

    pub(crate) fn take(&mut self, len: usize, field: Field) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::Truncated(field));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: Field) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn f32(&mut self, field: Field) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn bool(&mut self, field: Field) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ValidationError::Bool { field, value }.into()),
        }
    }

    /// A `u16` length and that many UTF-8 bytes; the length is checked against `max` before
    /// the string is allocated.
    pub(crate) fn text(&mut self, field: Field, max: u16) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        check_text_len(field, len, max)?;
        let bytes = self.take(len, field)?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| ValidationError::InvalidUtf8 { field })?;
        Ok(text.to_owned())
    }

    /// Succeeds only if the whole payload was read.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }
}

pub(crate) fn check_text_len(field: Field, len: usize, max: u16) -> Result<(), ValidationError> {
    let max = usize::from(max);
    if len > max {
        return Err(ValidationError::TextTooLong { field, len, max });
    }
    Ok(())
}

pub(crate) fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_f32(out: &mut Vec<u8>, value: f32) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Writes a `u16` length and the text. Callers validate the length first.
pub(crate) fn put_text(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("text lengths are validated against a u16 limit");
    put_u16(out, len);
    out.extend_from_slice(text.as_bytes());
}
