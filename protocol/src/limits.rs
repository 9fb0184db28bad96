//! The bounds every decoded field is held to, checked before anything is allocated.

/// Latent channels of the SD-1.x VAE: the only value accepted on the wire.
pub const LATENT_CHANNELS: u8 = 4;

/// Pixels per latent cell along each axis (the SD-1.x VAE downsamples by 8).
pub const VAE_SCALE: u16 = 8;

/// Limits applied by the [`Codec`](crate::Codec) when encoding and decoding.
///
/// Both sides use [`Limits::default`] unless a deployment agrees on other values; the defaults
/// are the ones `docs/protocol.md` specifies.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest payload, in bytes, of a frame sent by a kiosk.
    pub max_client_payload: u32,
    /// Largest payload, in bytes, of a frame sent by a gateway.
    pub max_server_payload: u32,
    /// Largest prompt or negative prompt, in UTF-8 bytes.
    pub max_prompt_bytes: u16,
    /// Largest prompt, in CLIP tokens including the start and end tokens (CLIP's context).
    pub max_prompt_tokens: u16,
    /// Largest error message, in UTF-8 bytes.
    pub max_message_bytes: u16,
    /// Smallest image side in pixels.
    pub min_side_px: u16,
    /// Largest image side in pixels.
    pub max_side_px: u16,
    /// Largest total step count of a schedule.
    pub max_steps: u16,
    /// Largest classifier-free guidance scale.
    pub max_guidance: f32,
    /// Largest job deadline, in milliseconds.
    pub max_deadline_ms: u32,
    /// Largest encoded image in a result, in bytes.
    pub max_image_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_client_payload: 1 << 20,
            max_server_payload: 24 << 20,
            max_prompt_bytes: 1024,
            max_prompt_tokens: 77,
            max_message_bytes: 1024,
            min_side_px: 256,
            max_side_px: 1024,
            max_steps: 200,
            max_guidance: 30.0,
            max_deadline_ms: 600_000,
            max_image_bytes: 20 << 20,
        }
    }
}

impl Limits {
    /// Checks a prompt's CLIP token count (start and end tokens included). The codec cannot
    /// count tokens (that needs the tokenizer), so the gateway calls this after tokenizing.
    pub fn check_prompt_tokens(
        &self,
        field: crate::Field,
        count: usize,
    ) -> Result<(), crate::ValidationError> {
        let max = usize::from(self.max_prompt_tokens);
        if count > max {
            return Err(crate::ValidationError::TooManyTokens { field, count, max });
        }
        Ok(())
    }
}
