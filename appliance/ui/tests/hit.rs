//! Taps become actions through the same rectangles the screens are drawn in.
#![allow(clippy::unwrap_used)]

use diffusionx_ui::{Action, Control, Key, Layout, Panel, RgbImage, Screen};
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;

/// Landscape and portrait panels from a 2.4" SPI panel to 1080p HDMI.
const PANELS: [(u32, u32); 6] = [
    (320, 240),
    (240, 320),
    (800, 480),
    (1280, 800),
    (1920, 1080),
    (1080, 1920),
];

fn layout(width_px: u32, height_px: u32) -> Layout {
    Layout::new(Panel {
        width_px,
        height_px,
        width_mm: None,
    })
    .unwrap()
}

fn typing(shift: bool) -> Screen {
    Screen::PromptEntry {
        text: "fox".into(),
        cursor_visible: true,
        shift,
        pressed: None,
        notice: None,
    }
}

fn preview() -> Screen {
    Screen::Preview {
        prompt: "fox".into(),
        image: RgbImage::from_fn(8, 8, |x, y| [x as u8, y as u8, 0]),
        round: 1,
        seed: 7,
    }
}

fn key_rect(controls: &[Control], key: Key) -> Rectangle {
    controls
        .iter()
        .find(|c| c.action == Action::Key(key))
        .unwrap_or_else(|| panic!("no {key:?} key"))
        .rect
}

fn all_screens() -> Vec<Screen> {
    let image = RgbImage::from_fn(4, 4, |_, _| [9, 9, 9]);
    vec![
        Screen::Attract {
            hint: "Touch to start".into(),
            last: None,
        },
        typing(false),
        Screen::Generating {
            prompt: "fox".into(),
            step: 1,
            total: 2,
            preview: None,
            round: 1,
        },
        preview(),
        Screen::Refining {
            image: None,
            status: diffusionx_ui::RefineStatus::Connecting,
        },
        Screen::Final {
            image,
            path: diffusionx_ui::FinalPath::Cloud,
        },
        Screen::Error {
            title: "Oops".into(),
            message: "Try again".into(),
        },
    ]
}

#[test]
fn tapping_each_key_center_types_that_key() {
    let mut expected: Vec<Action> = ('a'..='z')
        .chain('0'..='9')
        .chain([',', '.', '\'', '-', '!', '?'])
        .map(Key::Char)
        .chain([
            Key::Backspace,
            Key::Space,
            Key::Shift,
            Key::Clear,
            Key::Done,
        ])
        .map(Action::Key)
        .collect();
    expected.sort_by_key(|a| format!("{a:?}"));
    for (w, h) in PANELS {
        let layout = layout(w, h);
        let screen = typing(false);
        let controls = layout.controls(&screen);
        let mut actions: Vec<Action> = controls.iter().map(|c| c.action).collect();
        actions.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(actions, expected, "{w}x{h}");
        for control in &controls {
            assert_eq!(
                layout.hit(&screen, control.rect.center()),
                Some(control.action),
                "{w}x{h}"
            );
        }
    }
}

#[test]
fn keys_sit_in_qwerty_rows() {
    for (w, h) in PANELS {
        let controls = layout(w, h).controls(&typing(false));
        let at = |c| key_rect(&controls, Key::Char(c)).top_left;
        // Rows from top to bottom: digits, q, a, z; left to right within a row.
        assert!(at('1').y < at('q').y && at('q').y < at('a').y && at('a').y < at('z').y);
        assert_eq!(at('q').y, at('p').y);
        assert!(at('q').x < at('w').x && at('w').x < at('p').x);
        let space = key_rect(&controls, Key::Space).size.width;
        assert!(space > 3 * key_rect(&controls, Key::Char('q')).size.width);
    }
}

#[test]
fn shift_makes_letter_keys_type_capitals() {
    let layout = layout(800, 480);
    let lower = layout.controls(&typing(false));
    let screen = typing(true);
    let q = key_rect(&lower, Key::Char('q')).center();
    let seven = key_rect(&lower, Key::Char('7')).center();
    assert_eq!(layout.hit(&screen, q), Some(Action::Key(Key::Char('Q'))));
    assert_eq!(
        layout.hit(&screen, seven),
        Some(Action::Key(Key::Char('7')))
    );
}

#[test]
fn preview_buttons_edit_reseed_and_finalize() {
    for (w, h) in PANELS {
        let layout = layout(w, h);
        let screen = preview();
        let controls = layout.controls(&screen);
        let actions: Vec<Action> = controls.iter().map(|c| c.action).collect();
        assert_eq!(
            actions,
            [Action::EditPrompt, Action::NewSeed, Action::Finalize]
        );
        let finalize = controls[2].rect;
        assert_eq!(
            layout.hit(&screen, finalize.center()),
            Some(Action::Finalize)
        );
        // The bottom-right pixel of the button still counts; one beyond does not.
        let corner = finalize.bottom_right().unwrap();
        assert_eq!(layout.hit(&screen, corner), Some(Action::Finalize));
        assert_eq!(layout.hit(&screen, corner + Point::new(1, 1)), None);
    }
}

#[test]
fn taps_outside_every_control_hit_nothing() {
    for (w, h) in PANELS {
        let layout = layout(w, h);
        let screen = preview();
        assert_eq!(layout.hit(&screen, Point::zero()), None, "{w}x{h} corner");
        let above_buttons = layout.controls(&screen)[1].rect.top_left - Point::new(0, 1);
        assert_eq!(layout.hit(&screen, above_buttons), None, "{w}x{h} image");
        assert_eq!(
            layout.hit(&screen, Point::new(-5, 3)),
            None,
            "{w}x{h} off panel"
        );

        // The gap between two keys belongs to neither.
        let typing = typing(false);
        let controls = layout.controls(&typing);
        let gap = key_rect(&controls, Key::Char('q')).bottom_right().unwrap() + Point::new(1, 0);
        assert_eq!(layout.hit(&typing, gap), None, "{w}x{h} key gap");

        let busy = &all_screens()[2];
        let middle = Point::new(w as i32 / 2, h as i32 / 2);
        assert_eq!(layout.hit(busy, middle), None, "{w}x{h} generating");
    }
}

#[test]
fn a_running_preview_can_be_stopped_where_the_preview_screen_edits() {
    for (w, h) in PANELS {
        let layout = layout(w, h);
        let generating = &all_screens()[2];
        assert!(matches!(generating, Screen::Generating { .. }));
        let controls = layout.controls(generating);
        let actions: Vec<Action> = controls.iter().map(|c| c.action).collect();
        assert_eq!(actions, [Action::EditPrompt], "{w}x{h}");
        // The same place as the preview screen's "Edit prompt", so the finger finds it.
        assert_eq!(
            controls[0].rect,
            layout.controls(&preview())[0].rect,
            "{w}x{h}"
        );
        assert_eq!(
            layout.hit(generating, controls[0].rect.center()),
            Some(Action::EditPrompt)
        );
        // A refinement cannot be stopped: nothing reacts there.
        let refining = &all_screens()[4];
        assert!(matches!(refining, Screen::Refining { .. }));
        assert_eq!(layout.controls(refining), vec![], "{w}x{h}");
    }
}

#[test]
fn attract_starts_a_session_anywhere() {
    let layout = layout(240, 320);
    let screen = &all_screens()[0];
    for point in [Point::zero(), Point::new(239, 319), Point::new(120, 160)] {
        assert_eq!(layout.hit(screen, point), Some(Action::StartSession));
    }
    assert_eq!(layout.hit(screen, Point::new(240, 0)), None);
}

#[test]
fn controls_stay_on_the_panel_and_never_overlap() {
    for (w, h) in PANELS {
        let layout = layout(w, h);
        let panel = Rectangle::new(Point::zero(), Size::new(w, h));
        for screen in all_screens() {
            let controls = layout.controls(&screen);
            for (i, a) in controls.iter().enumerate() {
                assert!(!a.rect.is_zero_sized(), "{w}x{h} {:?}", a.action);
                assert_eq!(
                    panel.intersection(&a.rect),
                    a.rect,
                    "{w}x{h} {:?}",
                    a.action
                );
                for b in &controls[i + 1..] {
                    assert!(
                        a.rect.intersection(&b.rect).is_zero_sized(),
                        "{w}x{h}: {:?} overlaps {:?}",
                        a.action,
                        b.action
                    );
                }
            }
        }
    }
}
