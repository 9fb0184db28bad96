//! A cheap live preview: the predicted clean latent mapped to RGB by a fixed linear map, no VAE.

/// The SD 1.x latent -> RGB linear approximation (rows: latent channels; columns: R, G, B),
/// fitted to the VAE's output; widely used for step previews (e.g. ComfyUI's SD 1.5 previewer).
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// An RGB image, 8 bits per channel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, RGB interleaved.
    pub pixels: Vec<u8>,
}

/// Maps a `[4, height, width]` latent (scaled, as the UNet sees it) to an RGB image of the
/// latent's size (1/8 of the final image along each side).
pub fn latent_to_rgb(latent: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    assert_eq!(latent.len(), 4 * plane, "a [4, h, w] latent");
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        let mut rgb = [0.0f32; 3];
        for (c, factors) in LATENT_RGB.iter().enumerate() {
            let x = latent[c * plane + i];
            rgb.iter_mut().zip(factors).for_each(|(v, f)| *v += x * f);
        }
        pixels.extend(rgb.map(|v| to_u8((v + 1.0) / 2.0)));
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// A `[3, height, width]` VAE output in [-1, 1] to 8-bit RGB, as diffusers' image processor
/// does: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
pub fn decoded_to_rgb(image: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    assert_eq!(image.len(), 3 * plane, "a [3, h, w] image");
    let pixels = (0..plane)
        .flat_map(|i| (0..3).map(move |c| i + c * plane))
        .map(|at| to_u8(image[at] / 2.0 + 0.5))
        .collect();
    RgbImage {
        width,
        height,
        pixels,
    }
}

fn to_u8(unit: f32) -> u8 {
    // Clamped to [0, 255] first, so the cast cannot truncate.
    (unit.clamp(0.0, 1.0) * 255.0).round() as u8
}
