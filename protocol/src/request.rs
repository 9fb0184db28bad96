//! The refine request: everything the gateway needs to redo the end of a kiosk's preview.

use diffusionx_diffusion::NoiseLevel;

use crate::error::{DecodeError, ValidationError};
use crate::field::Field;
use crate::ids::{DeviceId, JobId, SessionId};
use crate::latent::Latent;
use crate::limits::{Limits, VAE_SCALE};
use crate::wire::{Reader, check_text_len, put_f32, put_text, put_u16, put_u32, put_u64};

/// Flag bit: send the refined latent back with the result.
const FLAG_RETURN_LATENT: u8 = 0x01;

/// Image size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
}

impl Resolution {
    /// Checks each side is a multiple of 8 inside the limits.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        let ok = |px: u16| {
            px.is_multiple_of(VAE_SCALE) && (limits.min_side_px..=limits.max_side_px).contains(&px)
        };
        if ok(self.width) && ok(self.height) {
            return Ok(());
        }
        Err(ValidationError::Resolution {
            width: self.width,
            height: self.height,
            min: limits.min_side_px,
            max: limits.max_side_px,
        })
    }
}

/// The denoising scheduler the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Scheduler {
    /// DDIM (eta = 0).
    Ddim = 1,
    /// Euler discrete.
    Euler = 2,
    /// DPM-Solver++ 2M (multistep, second order).
    DpmSolverPp2m = 3,
    /// Latent consistency model sampling.
    Lcm = 4,
}

impl Scheduler {
    /// The scheduler with wire code `code`.
    pub fn from_code(code: u8) -> Result<Self, ValidationError> {
        Ok(match code {
            1 => Self::Ddim,
            2 => Self::Euler,
            3 => Self::DpmSolverPp2m,
            4 => Self::Lcm,
            other => return Err(ValidationError::UnknownScheduler(other)),
        })
    }
}

/// An encoded image's container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ImageFormat {
    /// PNG, 8-bit RGB.
    Png = 1,
    /// Baseline JPEG, 8-bit RGB.
    Jpeg = 2,
}

impl ImageFormat {
    /// The format with wire code `code`.
    pub fn from_code(code: u8) -> Result<Self, ValidationError> {
        match code {
            1 => Ok(Self::Png),
            2 => Ok(Self::Jpeg),
            other => Err(ValidationError::UnknownImageFormat(other)),
        }
    }
}

/// The image encoding the kiosk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Lossless PNG.
    Png,
    /// JPEG at `quality` 1..=100.
    Jpeg {
        /// libjpeg-style quality, 1..=100.
        quality: u8,
    },
}

impl OutputFormat {
    fn from_codes(format: u8, quality: u8) -> Result<Self, ValidationError> {
        let output = match ImageFormat::from_code(format)? {
            ImageFormat::Png if quality != 0 => {
                return Err(ValidationError::JpegQuality {
                    format: "png",
                    quality,
                });
            }
            ImageFormat::Png => Self::Png,
            ImageFormat::Jpeg => Self::Jpeg { quality },
        };
        output.validate()?;
        Ok(output)
    }

    fn validate(self) -> Result<(), ValidationError> {
        match self {
            Self::Png => Ok(()),
            Self::Jpeg { quality: 1..=100 } => Ok(()),
            Self::Jpeg { quality } => Err(ValidationError::JpegQuality {
                format: "jpeg",
                quality,
            }),
        }
    }

    /// The container format.
    pub fn format(self) -> ImageFormat {
        match self {
            Self::Png => ImageFormat::Png,
            Self::Jpeg { .. } => ImageFormat::Jpeg,
        }
    }

    fn quality_byte(self) -> u8 {
        match self {
            Self::Png => 0,
            Self::Jpeg { quality } => quality,
        }
    }
}

/// Opens a job: refine this edge latent under the final prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct RefineRequest {
    /// Chosen by the kiosk, unique per finalize; echoed in every answer.
    pub job_id: JobId,
    /// The visitor session the job belongs to.
    pub session_id: SessionId,
    /// The kiosk sending it; must match its client certificate.
    pub device_id: DeviceId,
    /// The final prompt.
    pub prompt: String,
    /// The negative prompt; empty for none.
    pub negative_prompt: String,
    /// Seed of the re-noising noise (see the noise generator in `docs/protocol.md`).
    pub seed: u64,
    /// The image size; the latent is this divided by 8.
    pub resolution: Resolution,
    /// How much of the preview to redo.
    pub noise_level: NoiseLevel,
    /// Steps of the full schedule; `noise_level.denoising_steps(steps)` of them run.
    pub steps: u16,
    /// Classifier-free guidance scale; at most 1 means no guidance.
    pub guidance_scale: f32,
    /// The scheduler.
    pub scheduler: Scheduler,
    /// The encoding of the returned image.
    pub output: OutputFormat,
    /// Send the refined latent back too.
    pub return_latent: bool,
    /// The kiosk gives up after this many milliseconds from sending the request.
    pub deadline_ms: u32,
    /// The edge preview's final latent (already scaled by the VAE scaling factor).
    pub latent: Latent,
}

impl RefineRequest {
    pub(crate) fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        check_text_len(Field::Prompt, self.prompt.len(), limits.max_prompt_bytes)?;
        check_text_len(
            Field::NegativePrompt,
            self.negative_prompt.len(),
            limits.max_prompt_bytes,
        )?;
        self.resolution.validate(limits)?;
        if !(1..=limits.max_steps).contains(&self.steps) {
            return Err(ValidationError::Steps {
                value: self.steps,
                max: limits.max_steps,
            });
        }
        if self.noise_level.denoising_steps(self.steps) == 0 {
            return Err(ValidationError::NoDenoisingSteps {
                steps: self.steps,
                noise_level_bp: self.noise_level.bp(),
            });
        }
        if !(0.0..=limits.max_guidance).contains(&self.guidance_scale) {
            return Err(ValidationError::GuidanceScale {
                value: self.guidance_scale,
                max: limits.max_guidance,
            });
        }
        self.output.validate()?;
        if !(1..=limits.max_deadline_ms).contains(&self.deadline_ms) {
            return Err(ValidationError::Deadline {
                value: self.deadline_ms,
                max: limits.max_deadline_ms,
            });
        }
        // The resolution is valid by now: a latent of another size is the latent's fault
        // (field 16), not the resolution's.
        self.latent.shape().validate_for(self.resolution, limits)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.job_id.as_bytes());
        out.extend_from_slice(self.session_id.as_bytes());
        let device = self.device_id.as_str();
        out.push(u8::try_from(device.len()).expect("device ids are at most 64 bytes"));
        out.extend_from_slice(device.as_bytes());
        put_text(out, &self.prompt);
        put_text(out, &self.negative_prompt);
        put_u64(out, self.seed);
        put_u16(out, self.resolution.width);
        put_u16(out, self.resolution.height);
        put_u16(out, self.noise_level.bp());
        put_u16(out, self.steps);
        put_f32(out, self.guidance_scale);
        out.push(self.scheduler as u8);
        out.push(self.output.format() as u8);
        out.push(self.output.quality_byte());
        out.push(if self.return_latent {
            FLAG_RETURN_LATENT
        } else {
            0
        });
        put_u32(out, self.deadline_ms);
        self.latent.encode(out);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let job_id = JobId::from_bytes(reader.array(Field::JobId)?);
        let session_id = SessionId::from_bytes(reader.array(Field::SessionId)?);
        let device_len = usize::from(reader.u8(Field::DeviceId)?);
        let device_bytes = reader.take(device_len, Field::DeviceId)?;
        let device_id = DeviceId::new(String::from_utf8_lossy(device_bytes))?;
        let prompt = reader.text(Field::Prompt, limits.max_prompt_bytes)?;
        let negative_prompt = reader.text(Field::NegativePrompt, limits.max_prompt_bytes)?;
        let seed = reader.u64(Field::Seed)?;
        let resolution = Resolution {
            width: reader.u16(Field::Resolution)?,
            height: reader.u16(Field::Resolution)?,
        };
        let bp = reader.u16(Field::NoiseLevel)?;
        let noise_level = NoiseLevel::from_bp(bp).ok_or(ValidationError::NoiseLevel(bp))?;
        let steps = reader.u16(Field::Steps)?;
        let guidance_scale = reader.f32(Field::GuidanceScale)?;
        let scheduler = Scheduler::from_code(reader.u8(Field::Scheduler)?)?;
        let format = reader.u8(Field::OutputFormat)?;
        let output = OutputFormat::from_codes(format, reader.u8(Field::OutputFormat)?)?;
        let flags = reader.u8(Field::Flags)?;
        if flags & !FLAG_RETURN_LATENT != 0 {
            return Err(ValidationError::ReservedFlags(flags).into());
        }
        let deadline_ms = reader.u32(Field::Deadline)?;
        let latent = Latent::decode(reader, limits)?;
        Ok(Self {
            job_id,
            session_id,
            device_id,
            prompt,
            negative_prompt,
            seed,
            resolution,
            noise_level,
            steps,
            guidance_scale,
            scheduler,
            output,
            return_latent: flags & FLAG_RETURN_LATENT != 0,
            deadline_ms,
            latent,
        })
    }
}
