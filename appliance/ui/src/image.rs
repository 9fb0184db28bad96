//! The owned RGB picture type the screens carry, and its PNG helpers.

use std::fmt;

use embedded_graphics::pixelcolor::Rgb888;
use image::ImageEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};

/// An owned 8-bit RGB picture, row-major, three bytes a pixel.
///
/// The fields are private so that `pixels.len() == width * height * 3` always holds.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

/// Why bytes could not become an [`RgbImage`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The buffer does not hold `width * height` RGB pixels.
    #[error("{width}x{height} RGB8 needs {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height * 3`.
        expected: u64,
        /// The length of the buffer given.
        actual: usize,
    },
    /// The bytes are not a PNG file this crate can decode.
    #[error("cannot decode PNG")]
    Png(#[source] PngError),
}

/// A PNG decoding failure; wraps the codec's error without exposing the codec crate.
#[derive(Debug)]
pub struct PngError(image::ImageError);

impl fmt::Display for PngError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PngError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl RgbImage {
    /// Wraps a row-major RGB8 buffer; fails if its length is not `width * height * 3`.
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self, ImageError> {
        let expected = u64::from(width) * u64::from(height) * 3;
        if pixels.len() as u64 != expected {
            return Err(ImageError::SizeMismatch {
                width,
                height,
                expected,
                actual: pixels.len(),
            });
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// Builds a picture by asking `pixel(x, y)` for the RGB value of every pixel.
    pub fn from_fn(width: u32, height: u32, mut pixel: impl FnMut(u32, u32) -> [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
        for y in 0..height {
            for x in 0..width {
                pixels.extend_from_slice(&pixel(x, y));
            }
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The RGB8 bytes, row-major.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The color at `(x, y)`; `None` outside the picture.
    pub fn pixel(&self, x: u32, y: u32) -> Option<Rgb888> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some(Rgb888::new(
            self.pixels[i],
            self.pixels[i + 1],
            self.pixels[i + 2],
        ))
    }

    pub(crate) fn pixels_mut(&mut self) -> &mut [u8] {
        &mut self.pixels
    }

    /// Encodes the picture as an RGB8 PNG file.
    pub fn to_png(&self) -> Vec<u8> {
        let mut png = Vec::new();
        // Best compression: screenshots are committed as goldens and stay small.
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::Adaptive)
            .write_image(
                &self.pixels,
                self.width,
                self.height,
                image::ExtendedColorType::Rgb8,
            )
            .expect("encoding a size-checked RGB8 buffer into memory cannot fail");
        png
    }

    /// Decodes a PNG file of any color type into RGB8.
    pub fn from_png(png: &[u8]) -> Result<Self, ImageError> {
        let decoded = image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .map_err(|e| ImageError::Png(PngError(e)))?
            .into_rgb8();
        let (width, height) = decoded.dimensions();
        Self::from_raw(width, height, decoded.into_raw())
    }
}

impl fmt::Debug for RgbImage {
    // Pictures are hundreds of kilobytes: a derived Debug would flood test failures.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RgbImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}
