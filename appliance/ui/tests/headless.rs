//! The headless display is a real framebuffer: what is drawn is what is stored and saved.
#![allow(clippy::unwrap_used)]

use diffusionx_ui::{HeadlessDisplay, ImageError, RgbImage};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};

#[test]
fn drawn_pixels_land_in_row_major_rgb() {
    let mut display = HeadlessDisplay::new(3, 2);
    display
        .draw_iter([
            Pixel(Point::new(2, 0), Rgb888::new(1, 2, 3)),
            Pixel(Point::new(0, 1), Rgb888::new(4, 5, 6)),
            // Off the display: ignored, as DrawTarget requires.
            Pixel(Point::new(3, 0), Rgb888::new(9, 9, 9)),
            Pixel(Point::new(-1, 1), Rgb888::new(9, 9, 9)),
        ])
        .unwrap();
    assert_eq!(
        display.pixels(),
        [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(display.size(), Size::new(3, 2));
}

#[test]
fn fills_are_clipped_to_the_display() {
    let mut display = HeadlessDisplay::new(4, 4);
    Rectangle::new(Point::new(-2, 2), Size::new(4, 10))
        .into_styled(PrimitiveStyle::with_fill(Rgb888::WHITE))
        .draw(&mut display)
        .unwrap();
    let white: Vec<(u32, u32)> = (0..4)
        .flat_map(|y| (0..4).map(move |x| (x, y)))
        .filter(|&(x, y)| display.image().pixel(x, y) == Some(Rgb888::WHITE))
        .collect();
    assert_eq!(white, [(0, 2), (1, 2), (0, 3), (1, 3)]);
}

#[test]
fn png_round_trip_keeps_every_pixel() {
    let mut display = HeadlessDisplay::new(17, 5);
    display
        .draw_iter((0..17).map(|x| Pixel(Point::new(x, x % 5), Rgb888::new(x as u8 * 15, 7, 200))))
        .unwrap();
    let decoded = RgbImage::from_png(&display.to_png()).unwrap();
    assert_eq!(&decoded, display.image());
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    assert!(matches!(
        RgbImage::from_raw(2, 2, vec![0; 11]),
        Err(ImageError::SizeMismatch {
            expected: 12,
            actual: 11,
            ..
        })
    ));
    assert!(matches!(
        RgbImage::from_png(b"\x89PNG\r\n\x1a\nnot really"),
        Err(ImageError::Png(_))
    ));
}
