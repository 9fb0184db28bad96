//! The latent tensor a kiosk hands to the gateway (and the gateway may hand back).

use half::f16;

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::limits::{LATENT_CHANNELS, Limits, VAE_SCALE};
use crate::wire::{Reader, put_u16};

/// Element type of a latent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Dtype {
    /// IEEE 754 binary16, little-endian: half the bytes, ample for a latent handover.
    F16 = 1,
    /// IEEE 754 binary32, little-endian.
    F32 = 2,
}

impl Dtype {
    /// The dtype with wire code `code`.
    pub fn from_code(code: u8) -> Result<Self, ValidationError> {
        match code {
            1 => Ok(Self::F16),
            2 => Ok(Self::F32),
            other => Err(ValidationError::UnknownDtype(other)),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Shape of a latent: channels x height x width, batch 1, channel-major (NCHW with N = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    /// Channels; always 4 for the SD-1.x VAE.
    pub channels: u8,
    /// Height in latent cells (image height / 8).
    pub height: u16,
    /// Width in latent cells (image width / 8).
    pub width: u16,
}

impl LatentShape {
    /// Number of elements.
    pub fn len(&self) -> usize {
        usize::from(self.channels) * usize::from(self.height) * usize::from(self.width)
    }

    /// True for a shape with no elements (never a valid latent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the channel count and that this is the latent of an image of `resolution`
    /// (each side divided by 8), then [`LatentShape::validate`].
    pub fn validate_for(
        &self,
        resolution: crate::Resolution,
        limits: &Limits,
    ) -> Result<(), ValidationError> {
        if self.channels != LATENT_CHANNELS {
            return Err(ValidationError::LatentChannels(self.channels));
        }
        let expected_height = resolution.height / VAE_SCALE;
        let expected_width = resolution.width / VAE_SCALE;
        if (self.height, self.width) != (expected_height, expected_width) {
            return Err(ValidationError::LatentShape {
                latent_height: self.height,
                latent_width: self.width,
                expected_height,
                expected_width,
            });
        }
        self.validate(limits)
    }

    /// Checks the channel count and that the image this latent decodes to is inside `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        if self.channels != LATENT_CHANNELS {
            return Err(ValidationError::LatentChannels(self.channels));
        }
        let side_ok = |cells: u16| {
            let px = u32::from(cells) * u32::from(VAE_SCALE);
            (u32::from(limits.min_side_px)..=u32::from(limits.max_side_px)).contains(&px)
        };
        if !side_ok(self.height) || !side_ok(self.width) {
            return Err(ValidationError::Resolution {
                width: self.width.saturating_mul(VAE_SCALE),
                height: self.height.saturating_mul(VAE_SCALE),
                min: limits.min_side_px,
                max: limits.max_side_px,
            });
        }
        Ok(())
    }
}

/// Latent values in their wire dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum LatentData {
    /// Half precision values.
    F16(Vec<f16>),
    /// Single precision values.
    F32(Vec<f32>),
}

impl LatentData {
    fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }

    fn first_non_finite(&self) -> Option<(usize, f32)> {
        match self {
            Self::F16(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, v[i].to_f32())),
            Self::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
        }
    }
}

/// A finite latent tensor of a known shape. The constructors check the value count and that
/// every value is finite, so a `Latent` never holds a NaN or an infinity.
#[derive(Debug, Clone, PartialEq)]
pub struct Latent {
    shape: LatentShape,
    data: LatentData,
}

impl Latent {
    /// Wraps `data` of `shape`, refusing a wrong value count or a non-finite value.
    pub fn new(shape: LatentShape, data: LatentData) -> Result<Self, ValidationError> {
        if data.len() != shape.len() {
            return Err(ValidationError::LatentLength {
                expected: shape.len(),
                actual: data.len(),
            });
        }
        if let Some((index, value)) = data.first_non_finite() {
            return Err(ValidationError::NonFiniteLatent { index, value });
        }
        Ok(Self { shape, data })
    }

    /// Shape.
    pub fn shape(&self) -> LatentShape {
        self.shape
    }

    /// Wire dtype.
    pub fn dtype(&self) -> Dtype {
        match self.data {
            LatentData::F16(_) => Dtype::F16,
            LatentData::F32(_) => Dtype::F32,
        }
    }

    /// Values in their wire dtype.
    pub fn data(&self) -> &LatentData {
        &self.data
    }

    /// Values widened to f32, channel-major.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            LatentData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            LatentData::F32(v) => v.clone(),
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.dtype() as u8);
        out.push(self.shape.channels);
        put_u16(out, self.shape.height);
        put_u16(out, self.shape.width);
        match &self.data {
            LatentData::F16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            LatentData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    /// Reads dtype, shape and values; the shape is checked against `limits` before the values
    /// are allocated.
    pub(crate) fn decode(reader: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let dtype = Dtype::from_code(reader.u8(Field::Latent)?)?;
        let shape = LatentShape {
            channels: reader.u8(Field::Latent)?,
            height: reader.u16(Field::Latent)?,
            width: reader.u16(Field::Latent)?,
        };
        shape.validate(limits)?;
        let bytes = reader.take(shape.len() * dtype.size(), Field::Latent)?;
        let data = match dtype {
            Dtype::F16 => LatentData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::F32 => LatentData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        };
        Ok(Self::new(shape, data)?)
    }
}
