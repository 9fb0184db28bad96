//! Every screen, rendered on the headless display at two panel sizes, compared pixel for pixel
//! with the PNGs committed under `tests/golden/`.
//!
//! After an intended visual change, re-bless with `DX_BLESS=1 cargo test -p diffusionx-ui
//! --test golden` and review the new pictures. A mismatch writes the actual picture next to
//! the test binary's temporary folder and names it in the failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use diffusionx_ui::{
    FinalPath, HeadlessDisplay, Key, Layout, Panel, RefineStatus, RgbImage, Screen, render,
};

/// A 2.4" SPI panel and a 10.1" HDMI panel.
const PANELS: [Panel; 2] = [
    Panel {
        width_px: 320,
        height_px: 240,
        width_mm: Some(49.0),
    },
    Panel {
        width_px: 1280,
        height_px: 800,
        width_mm: Some(217.0),
    },
];

const PROMPT: &str = "A red fox in the snow, watercolor";

/// A deterministic stand-in for a generated picture; small, so the goldens compress well.
fn picture(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let r = (x * 255 / width.max(2).saturating_sub(1)) as u8;
        let g = (y * 255 / height.max(2).saturating_sub(1)) as u8;
        [r, g, if (x / 8 + y / 8) % 2 == 0 { 200 } else { 60 }]
    })
}

fn check(name: &str, screen: &Screen) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var("DX_BLESS").is_ok_and(|v| v == "1");
    for panel in PANELS {
        let layout = Layout::new(panel).unwrap();
        let mut display = HeadlessDisplay::new(panel.width_px, panel.height_px);
        render(screen, &layout, &mut display).unwrap();
        let file = format!("{name}_{}x{}.png", panel.width_px, panel.height_px);
        let path = dir.join(&file);
        if bless {
            std::fs::write(&path, display.to_png()).unwrap();
            continue;
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; bless with DX_BLESS=1", path.display()));
        let expected = RgbImage::from_png(&golden).unwrap();
        if &expected != display.image() {
            let actual = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&file);
            std::fs::write(&actual, display.to_png()).unwrap();
            let differing = expected
                .pixels()
                .chunks(3)
                .zip(display.pixels().chunks(3))
                .filter(|(a, b)| a != b)
                .count();
            panic!(
                "{file}: {differing} pixels differ from the golden (sizes {}x{} vs {}x{}); \
                 actual picture: {}",
                expected.width(),
                expected.height(),
                panel.width_px,
                panel.height_px,
                actual.display()
            );
        }
    }
}

#[test]
fn attract_alone() {
    check(
        "attract",
        &Screen::Attract {
            hint: "Touch to start".into(),
            last: None,
        },
    );
}

#[test]
fn attract_with_last_picture() {
    check(
        "attract_last",
        &Screen::Attract {
            hint: "Touch to start".into(),
            last: Some(picture(48, 32)),
        },
    );
}

#[test]
fn prompt_entry_with_pressed_key() {
    check(
        "prompt_entry",
        &Screen::PromptEntry {
            text: PROMPT.into(),
            cursor_visible: true,
            shift: false,
            pressed: Some(Key::Char('r')),
            notice: None,
        },
    );
}

#[test]
fn prompt_entry_with_a_blocked_word_notice() {
    check(
        "prompt_entry_notice",
        &Screen::PromptEntry {
            text: PROMPT.into(),
            cursor_visible: true,
            shift: false,
            pressed: None,
            notice: Some("Please try other words".into()),
        },
    );
}

#[test]
fn prompt_entry_empty_with_shift() {
    check(
        "prompt_entry_shift",
        &Screen::PromptEntry {
            text: String::new(),
            cursor_visible: false,
            shift: true,
            pressed: Some(Key::Shift),
            notice: None,
        },
    );
}

#[test]
fn generating_with_preview() {
    check(
        "generating",
        &Screen::Generating {
            prompt: PROMPT.into(),
            step: 7,
            total: 20,
            preview: Some(picture(32, 32)),
            round: 2,
        },
    );
}

#[test]
fn generating_before_first_preview() {
    check(
        "generating_start",
        &Screen::Generating {
            prompt: PROMPT.into(),
            step: 0,
            total: 20,
            preview: None,
            round: 1,
        },
    );
}

#[test]
fn preview_with_actions() {
    check(
        "preview",
        &Screen::Preview {
            prompt: PROMPT.into(),
            image: picture(64, 64),
            round: 2,
            seed: 1_234_567,
        },
    );
}

#[test]
fn refining_every_status() {
    let statuses = [
        ("connecting", RefineStatus::Connecting),
        (
            "queued",
            RefineStatus::Queued {
                position: 3,
                wait_ms: 4_200,
            },
        ),
        (
            "queued_next",
            RefineStatus::Queued {
                position: 0,
                wait_ms: 0,
            },
        ),
        ("cloud", RefineStatus::Cloud { step: 5, total: 8 }),
        ("local", RefineStatus::Local { step: 2, total: 8 }),
        // A local fallback before its first step: no step count yet.
        ("local_starting", RefineStatus::Local { step: 0, total: 0 }),
    ];
    for (name, status) in statuses {
        check(
            &format!("refining_{name}"),
            &Screen::Refining {
                image: Some(picture(64, 64)),
                status,
            },
        );
    }
}

#[test]
fn final_from_each_path() {
    for (name, path) in [("cloud", FinalPath::Cloud), ("local", FinalPath::Local)] {
        check(
            &format!("final_{name}"),
            &Screen::Final {
                image: picture(64, 64),
                path,
            },
        );
    }
}

#[test]
fn error_with_start_over() {
    check(
        "error",
        &Screen::Error {
            title: "Something went wrong".into(),
            message: "The picture could not be finished. Please start over; your next one \
                      will work."
                .into(),
        },
    );
}
