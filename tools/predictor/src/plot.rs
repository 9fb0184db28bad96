//! The evaluation plot: share of requests meeting the quality target (y, 0 to 100%) against
//! mean cloud steps (x, 0 to `N`), one filled square per policy, on a grid of 10% and
//! [`x_tick`] steps, with axis titles, tick values and a legend naming each policy beside its
//! colour ([`COLOURS`], in row order).
//!
//! Lines and markers are set pixel by pixel; text is embedded-graphics' 6x10 monospace font
//! drawn through a small [`DrawTarget`] over the image (no font files, no rasterizer).

use std::convert::Infallible;
use std::io::Cursor;

use embedded_graphics::Drawable;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::FONT_6X10;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Point, RgbColor, Size};
use embedded_graphics::text::{Alignment, Baseline, Text, TextStyleBuilder};
use image::{ImageFormat, Rgb, RgbImage};

use crate::evaluate::Row;

/// The plot's width in pixels (the axes and, right of them, the legend).
pub const WIDTH: u32 = 900;
/// The plot's height in pixels.
pub const HEIGHT: u32 = 440;
/// Marker colours by row, with their names for the markdown legend.
pub const COLOURS: [([u8; 3], &str); 6] = [
    ([31, 119, 180], "blue"),
    ([255, 127, 14], "orange"),
    ([44, 160, 44], "green"),
    ([214, 39, 40], "red"),
    ([148, 103, 189], "purple"),
    ([140, 86, 75], "brown"),
];
/// Half the side of a marker square.
pub const MARKER: i64 = 6;
/// Left edge of the legend: a swatch, then the policy's name.
pub const LEGEND_X: u32 = 624;
/// Top of the first legend entry.
pub const LEGEND_Y: u32 = 40;
/// Height of one legend entry.
pub const LEGEND_ROW: u32 = 18;
/// Side of a legend swatch.
pub const SWATCH: u32 = 10;
/// Where a legend entry's name starts.
pub const LEGEND_TEXT_X: u32 = LEGEND_X + SWATCH + 6;
/// The most characters of a name in the legend (longer names end in `...`).
pub const LEGEND_CHARS: usize = ((WIDTH - 8 - LEGEND_TEXT_X) / CHAR_WIDTH) as usize;

const LEFT: u32 = 60;
const RIGHT: u32 = WIDTH - 600;
const TOP: u32 = 30;
const BOTTOM: u32 = 50;
const CHAR_WIDTH: u32 = 6;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const AXIS: Rgb<u8> = Rgb([0, 0, 0]);
const INK: Rgb888 = Rgb888::BLACK;

/// The pixel of a point (mean steps, hit rate) with `steps_total` at the right edge.
pub fn pixel(steps: f64, hit_rate: f64, steps_total: u32) -> (i64, i64) {
    let w = f64::from(WIDTH - LEFT - RIGHT);
    let h = f64::from(HEIGHT - TOP - BOTTOM);
    let x = f64::from(LEFT) + w * steps / f64::from(steps_total.max(1));
    let y = f64::from(HEIGHT - BOTTOM) - h * hit_rate;
    (x.round() as i64, y.round() as i64)
}

/// The spacing of the x ticks and grid lines: the smallest of 1, 2, 5, 10, 20, 50, ... steps
/// that makes at most 10 intervals (5 for `N = 50`).
pub fn x_tick(steps_total: u32) -> u32 {
    let mut decade = 1u32;
    loop {
        for m in [1, 2, 5] {
            let step = decade.saturating_mul(m);
            if steps_total.div_ceil(step) <= 10 {
                return step;
            }
        }
        decade = decade.saturating_mul(10);
    }
}

/// The top-left corner of legend entry `i`'s swatch.
pub fn legend_entry(i: usize) -> (u32, u32) {
    (LEGEND_X, LEGEND_Y + LEGEND_ROW * i as u32)
}

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y))
        && x < WIDTH
        && y < HEIGHT
    {
        img.put_pixel(x, y, colour);
    }
}

/// embedded-graphics' view of the image, for the text.
struct Canvas<'a>(&'a mut RgbImage);

impl OriginDimensions for Canvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas<'_> {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, c) in pixels {
            // Outside the image: ignored, as DrawTarget's contract says.
            put(
                self.0,
                i64::from(p.x),
                i64::from(p.y),
                Rgb([c.r(), c.g(), c.b()]),
            );
        }
        Ok(())
    }
}

/// Writes `text` with its anchor point at (x, y).
fn text(
    img: &mut RgbImage,
    text: &str,
    (x, y): (i64, i64),
    alignment: Alignment,
    baseline: Baseline,
) {
    let style = TextStyleBuilder::new()
        .alignment(alignment)
        .baseline(baseline)
        .build();
    let at = Point::new(x as i32, y as i32);
    let Ok(_) = Text::with_text_style(text, at, MonoTextStyle::new(&FONT_6X10, INK), style)
        .draw(&mut Canvas(img));
}

/// A name cut to [`LEGEND_CHARS`] characters.
pub fn legend_name(name: &str) -> String {
    if name.chars().count() <= LEGEND_CHARS {
        return name.to_owned();
    }
    let cut: String = name.chars().take(LEGEND_CHARS - 3).collect();
    format!("{cut}...")
}

fn axes(img: &mut RgbImage, steps_total: u32) {
    let (x0, y0) = pixel(0.0, 0.0, steps_total);
    let (x1, y1) = pixel(f64::from(steps_total), 1.0, steps_total);
    for tenth in 0..=10 {
        let (_, y) = pixel(0.0, f64::from(tenth) / 10.0, steps_total);
        (x0..=x1).for_each(|x| put(img, x, y, GRID));
        let label = format!("{}%", tenth * 10);
        text(img, &label, (x0 - 6, y), Alignment::Right, Baseline::Middle);
    }
    let tick = x_tick(steps_total);
    for step in (0..=steps_total).step_by(tick as usize) {
        let (x, _) = pixel(f64::from(step), 0.0, steps_total);
        (y1..=y0).for_each(|y| put(img, x, y, GRID));
        text(
            img,
            &step.to_string(),
            (x, y0 + 6),
            Alignment::Center,
            Baseline::Top,
        );
    }
    (x0..=x1).for_each(|x| put(img, x, y0, AXIS));
    (y1..=y0).for_each(|y| put(img, x0, y, AXIS));
    text(
        img,
        &format!("mean cloud steps (of {steps_total})"),
        ((x0 + x1) / 2, i64::from(HEIGHT) - 8),
        Alignment::Center,
        Baseline::Bottom,
    );
    text(
        img,
        "share of requests meeting the quality target",
        (x0 - 40, i64::from(TOP) - 12),
        Alignment::Left,
        Baseline::Bottom,
    );
}

/// Draws the plot.
pub fn draw(rows: &[Row], steps_total: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, WHITE);
    axes(&mut img, steps_total);
    text(
        &mut img,
        "policy",
        (i64::from(LEGEND_X), i64::from(LEGEND_Y) - 8),
        Alignment::Left,
        Baseline::Bottom,
    );
    for (i, (row, (colour, _))) in rows.iter().zip(COLOURS.iter().cycle()).enumerate() {
        let (cx, cy) = pixel(row.mean_cloud_steps, row.hit_rate, steps_total);
        for dy in -MARKER..=MARKER {
            for dx in -MARKER..=MARKER {
                put(&mut img, cx + dx, cy + dy, Rgb(*colour));
            }
        }
        let (lx, ly) = legend_entry(i);
        for dy in 0..SWATCH {
            for dx in 0..SWATCH {
                put(
                    &mut img,
                    i64::from(lx + dx),
                    i64::from(ly + dy),
                    Rgb(*colour),
                );
            }
        }
        text(
            &mut img,
            &legend_name(&row.name),
            (i64::from(LEGEND_TEXT_X), i64::from(ly + SWATCH / 2)),
            Alignment::Left,
            Baseline::Middle,
        );
    }
    img
}

/// The image as PNG bytes.
pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png)
        .expect("encoding PNG into memory cannot fail");
    bytes.into_inner()
}

/// The legend line for the markdown: each row's name and colour.
pub fn legend(rows: &[Row]) -> String {
    rows.iter()
        .zip(COLOURS.iter().cycle())
        .map(|(r, (_, name))| format!("{} = {name}", r.name))
        .collect::<Vec<_>>()
        .join(", ")
}
