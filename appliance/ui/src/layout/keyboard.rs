//! The on-screen keyboard: which keys, in which rows, and where they sit.

use embedded_graphics::geometry::{Point, Size};
use embedded_graphics::primitives::Rectangle;

use crate::Key;

/// Rows of the keyboard as (key, width in half key units); every row is 20 half units wide, so
/// ten plain keys fill a row exactly.
const ROWS: [&[(Key, u32)]; 5] = [
    &[
        (Key::Char('1'), 2),
        (Key::Char('2'), 2),
        (Key::Char('3'), 2),
        (Key::Char('4'), 2),
        (Key::Char('5'), 2),
        (Key::Char('6'), 2),
        (Key::Char('7'), 2),
        (Key::Char('8'), 2),
        (Key::Char('9'), 2),
        (Key::Char('0'), 2),
    ],
    &[
        (Key::Char('q'), 2),
        (Key::Char('w'), 2),
        (Key::Char('e'), 2),
        (Key::Char('r'), 2),
        (Key::Char('t'), 2),
        (Key::Char('y'), 2),
        (Key::Char('u'), 2),
        (Key::Char('i'), 2),
        (Key::Char('o'), 2),
        (Key::Char('p'), 2),
    ],
    &[
        (Key::Char('a'), 2),
        (Key::Char('s'), 2),
        (Key::Char('d'), 2),
        (Key::Char('f'), 2),
        (Key::Char('g'), 2),
        (Key::Char('h'), 2),
        (Key::Char('j'), 2),
        (Key::Char('k'), 2),
        (Key::Char('l'), 2),
        (Key::Char('\''), 2),
    ],
    &[
        (Key::Shift, 3),
        (Key::Char('z'), 2),
        (Key::Char('x'), 2),
        (Key::Char('c'), 2),
        (Key::Char('v'), 2),
        (Key::Char('b'), 2),
        (Key::Char('n'), 2),
        (Key::Char('m'), 2),
        (Key::Backspace, 3),
    ],
    &[
        (Key::Clear, 3),
        (Key::Char(','), 2),
        (Key::Char('.'), 2),
        (Key::Space, 7),
        (Key::Char('-'), 2),
        (Key::Char('!'), 2),
        (Key::Char('?'), 2),
    ],
];

/// Plain keys per row: the keyboard is this many key pitches wide.
pub(crate) const COLUMNS: u32 = 10;

/// Number of key rows.
pub(crate) const ROW_COUNT: u32 = ROWS.len() as u32;

/// Places every key with its top-left corner at `origin`, one key every `pitch` pixels and
/// `gap` pixels between neighbours. Keys are returned unshifted (lower-case letters).
pub(crate) fn place(origin: Point, pitch: u32, gap: u32) -> Vec<(Key, Rectangle)> {
    let mut keys = Vec::new();
    for (row, row_keys) in (0u32..).zip(ROWS) {
        let y = origin.y + (row * pitch) as i32;
        let mut half_units = 0;
        for &(key, width) in row_keys {
            // Both edges come from the running total, so rounding never accumulates.
            let left = half_units * pitch / 2;
            half_units += width;
            let right = half_units * pitch / 2;
            let rect = Rectangle::new(
                Point::new(origin.x + left as i32, y),
                Size::new(
                    (right - left).saturating_sub(gap),
                    pitch.saturating_sub(gap),
                ),
            );
            keys.push((key, rect));
        }
    }
    keys
}

/// The key a tap on `key` types: letters become capitals while shift is on.
pub(crate) fn shifted(key: Key, shift: bool) -> Key {
    match key {
        Key::Char(c) if shift => Key::Char(c.to_ascii_uppercase()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_ten_keys_wide() {
        for row in ROWS {
            assert_eq!(row.iter().map(|&(_, w)| w).sum::<u32>(), COLUMNS * 2);
        }
    }

    #[test]
    fn plain_keys_are_one_pitch_minus_gap_wide_in_every_row() {
        for (key, rect) in place(Point::zero(), 31, 3) {
            if matches!(key, Key::Char(_)) {
                assert_eq!(rect.size, Size::new(28, 28), "{key:?}");
            }
        }
    }
}
