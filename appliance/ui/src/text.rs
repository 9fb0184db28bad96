//! Text on the panel: typefaces, word wrapping and drawing lines clipped to their box.
//!
//! The ISO 8859-1 mono fonts of embedded-graphics cover Latin-1, so "Noël" and "ÆØÅ" render
//! as themselves. The largest of them is 10x20 pixels, too small for an HDMI panel seen from a
//! metre away, so a [`Typeface`] may magnify a font by an integer factor.

use embedded_graphics::Drawable;
use embedded_graphics::Pixel;
use embedded_graphics::draw_target::{DrawTarget, DrawTargetExt};
use embedded_graphics::geometry::{Dimensions, Point, Size};
use embedded_graphics::mono_font::iso_8859_1::FONT_6X10;
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::primitives::Rectangle;
use embedded_graphics::text::{Baseline, Text};

/// The first character of `text` the kiosk's fonts cannot draw (they would show `'?'`), or
/// `None` when every character draws as itself.
///
/// Every typeface of a [`Layout`](crate::Layout) is an ISO 8859-1 mono font of
/// embedded-graphics, so this asks that font set's own glyph mapping: U+0020-007E and
/// U+00A0-00FF draw, anything else (control characters, curly quotes, Greek, CJK) does not.
pub fn undrawable(text: &str) -> Option<char> {
    let mapping = FONT_6X10.glyph_mapping;
    let replacement = mapping.index('?');
    text.chars()
        .find(|&c| c != '?' && mapping.index(c) == replacement)
}

/// A mono font at an integer magnification.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Typeface {
    font: &'static MonoFont<'static>,
    scale: u32,
}

impl Typeface {
    pub(crate) const fn new(font: &'static MonoFont<'static>, scale: u32) -> Self {
        Self { font, scale }
    }

    /// Horizontal distance from one character to the next, in panel pixels.
    pub(crate) fn advance(&self) -> u32 {
        (self.font.character_size.width + self.font.character_spacing) * self.scale
    }

    /// Height of one line, in panel pixels.
    pub(crate) fn line_height(&self) -> u32 {
        self.font.character_size.height * self.scale
    }

    /// How many characters fit side by side in `width` pixels (at least one).
    pub(crate) fn columns(&self, width: u32) -> usize {
        (width / self.advance()).max(1) as usize
    }

    /// How many lines fit above each other in `height` pixels.
    pub(crate) fn rows(&self, height: u32) -> usize {
        (height / self.line_height()) as usize
    }

    /// Width of `text` on one line, in panel pixels.
    pub(crate) fn width_of(&self, text: &str) -> u32 {
        text.chars().count() as u32 * self.advance()
    }
}

/// Splits `text` into lines of at most `columns` characters.
///
/// Words move to the next line whole when they fit on one; longer words are cut. Runs of
/// whitespace collapse to one space, and `\n` always starts a new line.
pub(crate) fn wrap(text: &str, columns: usize) -> Vec<String> {
    let columns = columns.max(1);
    let mut lines = Vec::new();
    for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut line_len = 0;
        for word in paragraph.split_whitespace() {
            let mut word: Vec<char> = word.chars().collect();
            if line_len > 0 && line_len + 1 + word.len() <= columns {
                line.push(' ');
                line_len += 1;
            } else if line_len > 0 {
                lines.push(std::mem::take(&mut line));
                line_len = 0;
            }
            while word.len() > columns {
                let rest = word.split_off(columns);
                lines.push(word.into_iter().collect());
                word = rest;
            }
            line_len += word.len();
            line.extend(word);
        }
        lines.push(line);
    }
    lines
}

/// Wraps `text` into `area` and keeps the lines that fit, ending the last kept line with "..."
/// when some had to go.
pub(crate) fn fit(text: &str, area: Rectangle, face: Typeface) -> Vec<String> {
    let columns = face.columns(area.size.width);
    let rows = face.rows(area.size.height).max(1);
    let mut lines = wrap(text, columns);
    if lines.len() > rows {
        lines.truncate(rows);
        if let Some(last) = lines.last_mut() {
            let keep = columns.saturating_sub(3);
            *last = last.chars().take(keep).collect::<String>() + "...";
        }
    }
    lines
}

/// Where lines sit inside their box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    /// From the top-left corner.
    TopLeft,
    /// Centered both ways, each line centered on its own.
    Center,
}

/// Draws `lines` in `area`; nothing is drawn outside `area`, whatever the text.
pub(crate) fn draw_lines<D>(
    target: &mut D,
    lines: &[String],
    area: Rectangle,
    face: Typeface,
    color: Rgb888,
    align: Align,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let mut clipped = target.clipped(&area);
    let line_height = face.line_height() as i32;
    let block_height = line_height * lines.len() as i32;
    let top = match align {
        Align::TopLeft => area.top_left.y,
        Align::Center => area.center().y - block_height / 2,
    };
    for (row, line) in lines.iter().enumerate() {
        let x = match align {
            Align::TopLeft => area.top_left.x,
            Align::Center => area.center().x - face.width_of(line) as i32 / 2,
        };
        let origin = Point::new(x, top + row as i32 * line_height);
        draw_line(&mut clipped, line, origin, face, color)?;
    }
    Ok(())
}

/// Draws one line of text with its top-left corner at `origin`.
fn draw_line<D>(
    target: &mut D,
    line: &str,
    origin: Point,
    face: Typeface,
    color: Rgb888,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let style = MonoTextStyle::new(face.font, color);
    let mut magnified = Magnify {
        target,
        origin,
        scale: face.scale,
    };
    Text::with_baseline(line, Point::zero(), style, Baseline::Top).draw(&mut magnified)?;
    Ok(())
}

/// A draw target that turns every pixel into a `scale` x `scale` block at `origin + p * scale`.
struct Magnify<'a, D> {
    target: &'a mut D,
    origin: Point,
    scale: u32,
}

impl<D: DrawTarget> Dimensions for Magnify<'_, D> {
    fn bounding_box(&self) -> Rectangle {
        let outer = self.target.bounding_box();
        Rectangle::new(
            (outer.top_left - self.origin) / self.scale as i32,
            outer.size / self.scale,
        )
    }
}

impl<D: DrawTarget> DrawTarget for Magnify<'_, D> {
    type Color = D::Color;
    type Error = D::Error;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let block = Size::new(self.scale, self.scale);
        for Pixel(point, color) in pixels {
            let at = self.origin + point * self.scale as i32;
            self.target.fill_solid(&Rectangle::new(at, block), color)?;
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        let at = self.origin + area.top_left * self.scale as i32;
        self.target
            .fill_solid(&Rectangle::new(at, area.size * self.scale), color)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_move_whole_and_long_words_are_cut() {
        assert_eq!(
            wrap("a cat sat on the mat", 7),
            ["a cat", "sat on", "the mat"]
        );
        assert_eq!(wrap("abcdefghij xy", 4), ["abcd", "efgh", "ij", "xy"]);
        assert_eq!(wrap("Noël  ÆØÅ", 4), ["Noël", "ÆØÅ"]);
    }

    #[test]
    fn newlines_break_and_empty_text_is_one_empty_line() {
        assert_eq!(wrap("ab\ncd", 10), ["ab", "cd"]);
        assert_eq!(wrap("", 10), [""]);
    }

    #[test]
    fn every_line_fits_its_columns() {
        let text = "Café crème brûlée à la façon de Noël, ÆØÅ äöü ß supercalifragilistic";
        for columns in 1..30 {
            for line in wrap(text, columns) {
                assert!(line.chars().count() <= columns, "{line:?} > {columns}");
            }
        }
    }

    #[test]
    fn latin_1_draws_and_anything_else_is_named() {
        assert_eq!(undrawable("Touch the screen? Noël, ÆØÅ ÿ \u{a0}~"), None);
        assert_eq!(undrawable("Dotknij ekranu, aby zacząć"), Some('ą'));
        assert_eq!(undrawable("Let\u{2019}s draw"), Some('\u{2019}'));
        assert_eq!(undrawable("tab\there"), Some('\t'));
        assert_eq!(undrawable("Ζ"), Some('Ζ'));
    }
}
