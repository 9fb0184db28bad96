//! Names for the parts of a frame, so an error can say which one is at fault.

use std::fmt;

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $text:literal;)*) => {
        /// A part of a frame. Carried in [`JobError::InvalidRequest`](crate::JobError) so the
        /// kiosk learns which field the gateway refused; codes are stable wire values.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Field {
            $($(#[$doc])* $name = $code,)*
        }

        impl Field {
            /// The field with wire code `code`, if there is one.
            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(Self::$name),)*
                    _ => None,
                }
            }

            /// The wire code of this field.
            pub fn code(self) -> u8 {
                self as u8
            }

            /// The field's name as `docs/protocol.md` spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$name => $text,)*
                }
            }
        }
    };
}

fields! {
    /// The frame header or its length.
    Frame = 1, "frame";
    /// `job_id`.
    JobId = 2, "job_id";
    /// `session_id`.
    SessionId = 3, "session_id";
    /// `device_id`.
    DeviceId = 4, "device_id";
    /// `prompt`.
    Prompt = 5, "prompt";
    /// `negative_prompt`.
    NegativePrompt = 6, "negative_prompt";
    /// `seed`.
    Seed = 7, "seed";
    /// `width` / `height` of the image.
    Resolution = 8, "resolution";
    /// `noise_level`.
    NoiseLevel = 9, "noise_level";
    /// `steps`.
    Steps = 10, "steps";
    /// `guidance_scale`.
    GuidanceScale = 11, "guidance_scale";
    /// `scheduler`.
    Scheduler = 12, "scheduler";
    /// `output_format` / `jpeg_quality`.
    OutputFormat = 13, "output_format";
    /// `flags`.
    Flags = 14, "flags";
    /// `deadline_ms`.
    Deadline = 15, "deadline_ms";
    /// The latent tensor (dtype, shape or values).
    Latent = 16, "latent";
    /// A progress report's counters.
    Progress = 17, "progress";
    /// A result's image.
    Image = 18, "image";
    /// A result's timings or step count.
    Timings = 19, "timings";
    /// An error frame's code or its fields.
    Error = 20, "error";
    /// A load report's fields.
    Load = 21, "load";
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
