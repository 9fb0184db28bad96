//! What the renderer promises beyond the goldens: text stays in its box, Latin-1 is drawn as
//! itself, highlights stay on their key, pictures keep their shape.
#![allow(clippy::unwrap_used)]

use diffusionx_ui::{Action, HeadlessDisplay, Key, Layout, Panel, RgbImage, Screen, render};
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;

const LATIN_1: &str = "Café crème brûlée à la façon de Noël, ÆØÅ äöü ß";

fn layout(width_px: u32, height_px: u32) -> Layout {
    Layout::new(Panel {
        width_px,
        height_px,
        width_mm: None,
    })
    .unwrap()
}

fn draw(layout: &Layout, screen: &Screen) -> HeadlessDisplay {
    let panel = layout.panel();
    let mut display = HeadlessDisplay::new(panel.width_px, panel.height_px);
    render(screen, layout, &mut display).unwrap();
    display
}

fn typing(text: &str, pressed: Option<Key>) -> Screen {
    Screen::PromptEntry {
        text: text.into(),
        cursor_visible: false,
        shift: false,
        pressed,
        notice: None,
    }
}

/// Points where the two displays differ.
fn differences(a: &HeadlessDisplay, b: &HeadlessDisplay) -> Vec<Point> {
    let width = a.image().width() as usize;
    a.pixels()
        .chunks(3)
        .zip(b.pixels().chunks(3))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| Point::new((i % width) as i32, (i / width) as i32))
        .collect()
}

/// The smallest rectangle holding every point.
fn bounds(points: &[Point]) -> Rectangle {
    let min = points.iter().fold(points[0], |m, p| m.component_min(*p));
    let max = points.iter().fold(points[0], |m, p| m.component_max(*p));
    Rectangle::with_corners(min, max)
}

#[test]
fn long_latin_1_prompt_wraps_inside_its_box() {
    let long = [LATIN_1; 4].join(" ");
    for (w, h) in [(320, 240), (240, 320), (1280, 800), (1080, 1920)] {
        let layout = layout(w, h);
        let text_box = layout.prompt_text_box();
        // A lone space draws an empty box: no placeholder, no visible text.
        let blank = draw(&layout, &typing(" ", None));
        let drawn =
            |prompt: &str| bounds(&differences(&blank, &draw(&layout, &typing(prompt, None))));
        for prompt in [LATIN_1, long.as_str()] {
            let drawn = drawn(prompt);
            assert_eq!(
                text_box.intersection(&drawn),
                drawn,
                "{w}x{h}: text at {drawn:?} leaves {text_box:?}"
            );
        }
        // The long prompt is wrapped: several lines, filling most of the box's width.
        let one_line = drawn("Café");
        let all_lines = drawn(&long);
        assert!(
            all_lines.size.height >= 3 * one_line.size.height,
            "{w}x{h}: {all_lines:?}"
        );
        assert!(
            all_lines.size.width * 10 >= text_box.size.width * 8,
            "{w}x{h}: {all_lines:?}"
        );
    }
}

#[test]
fn latin_1_letters_render_as_themselves() {
    let layout = layout(320, 240);
    let accented = draw(&layout, &typing("Noël ÆØÅ ß", None));
    let replaced = draw(&layout, &typing("No?l ??? ?", None));
    let plain = draw(&layout, &typing("Noel AOA s", None));
    assert!(!differences(&accented, &replaced).is_empty());
    assert!(!differences(&accented, &plain).is_empty());
}

#[test]
fn pressed_key_highlight_stays_on_its_key() {
    for (w, h) in [(320, 240), (1080, 1920)] {
        let layout = layout(w, h);
        let screen = typing("fox", Some(Key::Char('Q')));
        let q = layout
            .controls(&screen)
            .into_iter()
            .find(|c| c.action == Action::Key(Key::Char('q')))
            .unwrap()
            .rect;
        let changed = differences(
            &draw(&layout, &typing("fox", None)),
            &draw(&layout, &screen),
        );
        assert!(!changed.is_empty());
        assert_eq!(q.intersection(&bounds(&changed)), bounds(&changed));
    }
}

#[test]
fn pictures_keep_their_aspect_ratio() {
    // Left half red, right half blue: 2:1 overall.
    let image = RgbImage::from_fn(
        40,
        20,
        |x, _| if x < 20 { [255, 0, 0] } else { [0, 0, 255] },
    );
    let screen = Screen::Preview {
        prompt: "fox".into(),
        image,
        round: 1,
        seed: 1,
    };
    for (w, h) in [(320, 240), (240, 320), (1920, 1080)] {
        let display = draw(&layout(w, h), &screen);
        let of_color = |rgb: &[u8]| -> Vec<Point> {
            let width = w as usize;
            display
                .pixels()
                .chunks(3)
                .enumerate()
                .filter(|(_, p)| *p == rgb)
                .map(|(i, _)| Point::new((i % width) as i32, (i / width) as i32))
                .collect()
        };
        let red = bounds(&of_color(&[255, 0, 0]));
        let blue = bounds(&of_color(&[0, 0, 255]));
        assert_eq!(red.size, blue.size, "{w}x{h}");
        assert_eq!(red.top_left.x + red.size.width as i32, blue.top_left.x);
        // Each half of a 2:1 picture is square, give or take rounding.
        assert!(
            red.size.width.abs_diff(red.size.height) <= 1,
            "{w}x{h}: {red:?}"
        );
    }
}
