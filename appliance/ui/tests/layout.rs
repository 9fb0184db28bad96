//! Key sizes in millimetres, and the panels a layout accepts.
#![allow(clippy::unwrap_used)]

use diffusionx_ui::{Action, Control, Key, Layout, LayoutError, MIN_KEY_MM, Panel, Screen};
use embedded_graphics::primitives::Rectangle;

fn panel(width_px: u32, height_px: u32, width_mm: Option<f32>) -> Panel {
    Panel {
        width_px,
        height_px,
        width_mm,
    }
}

fn keyboard(layout: &Layout) -> Vec<Control> {
    let screen = Screen::PromptEntry {
        text: String::new(),
        cursor_visible: false,
        shift: false,
        pressed: None,
        notice: None,
    };
    layout.controls(&screen)
}

fn key(controls: &[Control], c: char) -> Rectangle {
    controls
        .iter()
        .find(|control| control.action == Action::Key(Key::Char(c)))
        .unwrap()
        .rect
}

/// Width of the `q` key as drawn and hit-tested.
fn drawn_key_width(layout: &Layout) -> u32 {
    key(&keyboard(layout), 'q').size.width
}

#[test]
fn seven_inch_800x480_keys_are_at_least_9_mm() {
    let layout = Layout::new(panel(800, 480, Some(154.0))).unwrap();
    let mm = layout.key_size_mm().unwrap();
    assert!(mm >= MIN_KEY_MM, "{mm} mm");
    assert_eq!(drawn_key_width(&layout), layout.key_size_px());
    let expected = layout.key_size_px() as f32 * 154.0 / 800.0;
    assert!((mm - expected).abs() < 1e-4, "{mm} vs {expected}");
}

#[test]
fn small_320x240_reports_its_smaller_keys_honestly() {
    let layout = Layout::new(panel(320, 240, Some(49.0))).unwrap();
    let px = layout.key_size_px();
    let mm = layout.key_size_mm().unwrap();
    assert!(mm < MIN_KEY_MM, "{mm} mm");
    assert!((mm - px as f32 * 49.0 / 320.0).abs() < 1e-4);
    assert_eq!(drawn_key_width(&layout), px);
    // The largest that fits: the digit row spans at least 90% of the panel and stays on it.
    let controls = keyboard(&layout);
    let left = key(&controls, '1').top_left.x;
    let right = key(&controls, '0').bottom_right().unwrap().x;
    assert!(left >= 0 && right < 320, "{left}..={right}");
    assert!(right - left + 1 >= 288, "{left}..={right}");
}

#[test]
fn physical_panels_that_can_fit_9_mm_keys_get_them() {
    let panels = [
        panel(1280, 800, Some(217.0)),
        panel(1920, 1080, Some(476.0)),
        panel(1080, 1920, Some(268.0)),
    ];
    for panel in panels {
        let layout = Layout::new(panel).unwrap();
        let mm = layout.key_size_mm().unwrap();
        assert!(mm >= MIN_KEY_MM, "{panel:?}: {mm} mm");
        assert_eq!(drawn_key_width(&layout), layout.key_size_px());
    }
}

#[test]
fn unknown_physical_size_reports_no_millimetres() {
    let layout = Layout::new(panel(1280, 800, None)).unwrap();
    assert_eq!(layout.key_size_mm(), None);
    assert!(layout.key_size_px() > 0);
}

#[test]
fn unsupported_panels_are_refused() {
    assert_eq!(
        Layout::new(panel(160, 128, None)).unwrap_err(),
        LayoutError::UnsupportedSize {
            width_px: 160,
            height_px: 128
        }
    );
    assert_eq!(
        Layout::new(panel(320, 240, Some(0.0))).unwrap_err(),
        LayoutError::InvalidWidth { width_mm: 0.0 }
    );
    assert!(matches!(
        Layout::new(panel(320, 240, Some(f32::NAN))),
        Err(LayoutError::InvalidWidth { .. })
    ));
}
