//! The final answer of a job: the encoded image, optionally the refined latent, and timings.

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::ids::JobId;
use crate::latent::Latent;
use crate::limits::Limits;
use crate::request::{ImageFormat, Resolution};
use crate::wire::{Reader, put_u16, put_u32};

/// Time the gateway spent in each phase of a job, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseTimings {
    /// Admitted to started.
    pub queue_us: u32,
    /// Prompt tokenization and text encoding.
    pub text_us: u32,
    /// Re-noising and every denoising step.
    pub denoise_us: u32,
    /// VAE decode.
    pub decode_us: u32,
    /// PNG / JPEG encoding.
    pub encode_us: u32,
    /// Request received to result sent.
    pub total_us: u32,
}

impl PhaseTimings {
    fn encode(&self, out: &mut Vec<u8>) {
        for value in [
            self.queue_us,
            self.text_us,
            self.denoise_us,
            self.decode_us,
            self.encode_us,
            self.total_us,
        ] {
            put_u32(out, value);
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            queue_us: reader.u32(Field::Timings)?,
            text_us: reader.u32(Field::Timings)?,
            denoise_us: reader.u32(Field::Timings)?,
            decode_us: reader.u32(Field::Timings)?,
            encode_us: reader.u32(Field::Timings)?,
            total_us: reader.u32(Field::Timings)?,
        })
    }
}

/// An encoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedImage {
    /// Container format.
    pub format: ImageFormat,
    /// Size in pixels.
    pub resolution: Resolution,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// The refined image of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct RefineResult {
    /// The job.
    pub job_id: JobId,
    /// Denoising steps the gateway ran.
    pub steps_run: u16,
    /// Where the gateway's time went.
    pub timings: PhaseTimings,
    /// The final image.
    pub image: EncodedImage,
    /// The refined latent, when the request asked for it.
    pub latent: Option<Latent>,
}

impl RefineResult {
    pub(crate) fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        self.image.resolution.validate(limits)?;
        let (len, max) = (self.image.bytes.len(), limits.max_image_bytes as usize);
        if len == 0 || len > max {
            return Err(ValidationError::ImageSize { len, max });
        }
        match &self.latent {
            // protocol.md: the refined latent is the image's, its sides divided by 8.
            Some(latent) => latent.shape().validate_for(self.image.resolution, limits),
            None => Ok(()),
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.job_id.as_bytes());
        put_u16(out, self.steps_run);
        self.timings.encode(out);
        out.push(self.image.format as u8);
        put_u16(out, self.image.resolution.width);
        put_u16(out, self.image.resolution.height);
        let len = u32::try_from(self.image.bytes.len()).expect("image size is validated");
        put_u32(out, len);
        out.extend_from_slice(&self.image.bytes);
        match &self.latent {
            Some(latent) => {
                out.push(1);
                latent.encode(out);
            }
            None => out.push(0),
        }
    }

    pub(crate) fn decode(reader: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let job_id = JobId::from_bytes(reader.array(Field::JobId)?);
        let steps_run = reader.u16(Field::Timings)?;
        let timings = PhaseTimings::decode(reader)?;
        let format = ImageFormat::from_code(reader.u8(Field::Image)?)?;
        let resolution = Resolution {
            width: reader.u16(Field::Image)?,
            height: reader.u16(Field::Image)?,
        };
        let len = reader.u32(Field::Image)? as usize;
        let max = limits.max_image_bytes as usize;
        if len == 0 || len > max {
            return Err(ValidationError::ImageSize { len, max }.into());
        }
        let bytes = reader.take(len, Field::Image)?.to_vec();
        let latent = match reader.bool(Field::Latent)? {
            true => Some(Latent::decode(reader, limits)?),
            false => None,
        };
        Ok(Self {
            job_id,
            steps_run,
            timings,
            image: EncodedImage {
                format,
                resolution,
                bytes,
            },
            latent,
        })
    }
}
