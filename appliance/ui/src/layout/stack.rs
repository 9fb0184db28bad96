//! Cutting a box into bands, the one way every screen arranges its parts.

use embedded_graphics::geometry::{Point, Size};
use embedded_graphics::primitives::Rectangle;

/// Takes bands off the top and bottom of a box, with `gap` pixels between bands.
///
/// Heights saturate: on a panel too small for everything, bands shrink rather than overlap.
pub(crate) struct Stack {
    area: Rectangle,
    gap: u32,
}

impl Stack {
    pub(crate) fn new(area: Rectangle, gap: u32) -> Self {
        Self { area, gap }
    }

    /// The top `height` pixels of what is left.
    pub(crate) fn top(&mut self, height: u32) -> Rectangle {
        let height = height.min(self.area.size.height);
        let band = Rectangle::new(self.area.top_left, Size::new(self.area.size.width, height));
        let used = (height + self.gap).min(self.area.size.height);
        self.area.top_left.y += used as i32;
        self.area.size.height -= used;
        band
    }

    /// The bottom `height` pixels of what is left.
    pub(crate) fn bottom(&mut self, height: u32) -> Rectangle {
        let height = height.min(self.area.size.height);
        let top = self.area.top_left.y + (self.area.size.height - height) as i32;
        let band = Rectangle::new(
            Point::new(self.area.top_left.x, top),
            Size::new(self.area.size.width, height),
        );
        self.area.size.height -= (height + self.gap).min(self.area.size.height);
        band
    }

    /// Whatever is left between the bands taken so far.
    pub(crate) fn rest(self) -> Rectangle {
        self.area
    }
}

/// Splits `area` into `N` boxes of equal width side by side, `gap` pixels apart.
pub(crate) fn columns<const N: usize>(area: Rectangle, gap: u32) -> [Rectangle; N] {
    let count = N.max(1) as u32;
    let width = area.size.width.saturating_sub(gap * (count - 1)) / count;
    std::array::from_fn(|i| {
        let x = area.top_left.x + (i as u32 * (width + gap)) as i32;
        Rectangle::new(
            Point::new(x, area.top_left.y),
            Size::new(width, area.size.height),
        )
    })
}

/// A box of `size` centered in `area`.
pub(crate) fn centered(area: Rectangle, size: Size) -> Rectangle {
    let size = Size::new(
        size.width.min(area.size.width),
        size.height.min(area.size.height),
    );
    let offset = Point::new(
        ((area.size.width - size.width) / 2) as i32,
        ((area.size.height - size.height) / 2) as i32,
    );
    Rectangle::new(area.top_left + offset, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x: i32, y: i32, w: u32, h: u32) -> Rectangle {
        Rectangle::new(Point::new(x, y), Size::new(w, h))
    }

    #[test]
    fn bands_come_off_both_ends_with_gaps() {
        let mut stack = Stack::new(rect(10, 10, 100, 100), 5);
        assert_eq!(stack.top(20), rect(10, 10, 100, 20));
        assert_eq!(stack.bottom(10), rect(10, 100, 100, 10));
        assert_eq!(stack.rest(), rect(10, 35, 100, 60));
    }

    #[test]
    fn oversized_bands_saturate() {
        let mut stack = Stack::new(rect(0, 0, 10, 10), 2);
        assert_eq!(stack.top(50), rect(0, 0, 10, 10));
        assert_eq!(stack.rest().size, Size::new(10, 0));
    }

    #[test]
    fn columns_are_equal_and_apart() {
        assert_eq!(
            columns::<3>(rect(0, 0, 100, 10), 5),
            [rect(0, 0, 30, 10), rect(35, 0, 30, 10), rect(70, 0, 30, 10)]
        );
    }
}
