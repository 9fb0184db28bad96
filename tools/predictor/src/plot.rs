//! The evaluation plot, drawn by hand: share of requests meeting the quality target (y, 0 to
//! 100%) against mean cloud steps (x, 0 to `N`), one filled square per policy, on a grid of
//! 10% and 5 steps. No text is drawn (no font dependency): the table beside it names each
//! policy's colour ([`COLOURS`], in row order).

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};

use crate::evaluate::Row;

/// The plot's width in pixels.
pub const WIDTH: u32 = 640;
/// The plot's height in pixels.
pub const HEIGHT: u32 = 400;
/// Marker colours by row, with their names for the legend.
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

const LEFT: u32 = 40;
const RIGHT: u32 = 20;
const TOP: u32 = 20;
const BOTTOM: u32 = 40;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const AXIS: Rgb<u8> = Rgb([0, 0, 0]);

/// The pixel of a point (mean steps, hit rate) with `steps_total` at the right edge.
pub fn pixel(steps: f64, hit_rate: f64, steps_total: u32) -> (i64, i64) {
    let w = f64::from(WIDTH - LEFT - RIGHT);
    let h = f64::from(HEIGHT - TOP - BOTTOM);
    let x = f64::from(LEFT) + w * steps / f64::from(steps_total.max(1));
    let y = f64::from(HEIGHT - BOTTOM) - h * hit_rate;
    (x.round() as i64, y.round() as i64)
}

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y))
        && x < WIDTH
        && y < HEIGHT
    {
        img.put_pixel(x, y, colour);
    }
}

/// Draws the plot.
pub fn draw(rows: &[Row], steps_total: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, WHITE);
    let (x0, y0) = pixel(0.0, 0.0, steps_total);
    let (x1, y1) = pixel(f64::from(steps_total), 1.0, steps_total);
    for tenth in 0..=10 {
        let (_, y) = pixel(0.0, f64::from(tenth) / 10.0, steps_total);
        (x0..=x1).for_each(|x| put(&mut img, x, y, GRID));
    }
    for step in (0..=steps_total).step_by(5) {
        let (x, _) = pixel(f64::from(step), 0.0, steps_total);
        (y1..=y0).for_each(|y| put(&mut img, x, y, GRID));
    }
    (x0..=x1).for_each(|x| put(&mut img, x, y0, AXIS));
    (y1..=y0).for_each(|y| put(&mut img, x0, y, AXIS));
    for (row, (colour, _)) in rows.iter().zip(COLOURS.iter().cycle()) {
        let (cx, cy) = pixel(row.mean_cloud_steps, row.hit_rate, steps_total);
        for dy in -MARKER..=MARKER {
            for dx in -MARKER..=MARKER {
                put(&mut img, cx + dx, cy + dy, Rgb(*colour));
            }
        }
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
