//! An in-memory RGB888 framebuffer: the display backend of tests, the demo and screenshots.

use std::convert::Infallible;

use embedded_graphics::Pixel;
use embedded_graphics::draw_target::DrawTarget;
use embedded_graphics::geometry::{Dimensions, OriginDimensions, Size};
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::primitives::Rectangle;

use crate::RgbImage;

/// A framebuffer in memory that the screens can be drawn on and saved as PNG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadlessDisplay {
    frame: RgbImage,
}

impl HeadlessDisplay {
    /// A black framebuffer of `width` x `height` pixels.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            frame: RgbImage::from_fn(width, height, |_, _| [0, 0, 0]),
        }
    }

    /// The framebuffer's bytes: RGB8, row-major.
    pub fn pixels(&self) -> &[u8] {
        self.frame.pixels()
    }

    /// The framebuffer as a picture.
    pub fn image(&self) -> &RgbImage {
        &self.frame
    }

    /// The framebuffer encoded as an RGB8 PNG file.
    pub fn to_png(&self) -> Vec<u8> {
        self.frame.to_png()
    }

    fn put(&mut self, x: u32, y: u32, color: Rgb888) {
        let i = (y as usize * self.frame.width() as usize + x as usize) * 3;
        self.frame.pixels_mut()[i..i + 3].copy_from_slice(&[color.r(), color.g(), color.b()]);
    }
}

impl OriginDimensions for HeadlessDisplay {
    fn size(&self) -> Size {
        Size::new(self.frame.width(), self.frame.height())
    }
}

impl DrawTarget for HeadlessDisplay {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (width, height) = (self.frame.width(), self.frame.height());
        for Pixel(point, color) in pixels {
            // DrawTarget's contract: pixels outside the display are ignored.
            if let (Ok(x), Ok(y)) = (u32::try_from(point.x), u32::try_from(point.y))
                && x < width
                && y < height
            {
                self.put(x, y, color);
            }
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        // Clearing and filling boxes is most of a frame; skip the per-pixel iterator.
        let area = area.intersection(&self.bounding_box());
        let rgb = [color.r(), color.g(), color.b()];
        let width = self.frame.width() as usize;
        for y in area.rows() {
            let start = (y as usize * width + area.top_left.x as usize) * 3;
            let row = &mut self.frame.pixels_mut()[start..start + area.size.width as usize * 3];
            for pixel in row.chunks_exact_mut(3) {
                pixel.copy_from_slice(&rgb);
            }
        }
        Ok(())
    }
}
