//! Where everything goes on a given panel, computed once, shared by drawing and hit testing.

mod keyboard;
mod stack;

use embedded_graphics::geometry::{Point, Size};
use embedded_graphics::mono_font::iso_8859_1::{
    FONT_5X8, FONT_6X10, FONT_7X13, FONT_9X15, FONT_9X18_BOLD, FONT_10X20,
};
use embedded_graphics::primitives::Rectangle;

use crate::text::Typeface;
use crate::{Action, Key, Screen};
pub(crate) use stack::centered;
use stack::{Stack, columns};

/// The smallest touch key this layout aims for, in millimetres (a fingertip).
pub const MIN_KEY_MM: f32 = 9.0;

/// The display the kiosk draws on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Panel {
    /// Width in pixels.
    pub width_px: u32,
    /// Height in pixels.
    pub height_px: u32,
    /// Physical width of the visible area in millimetres, when the panel's datasheet is known.
    pub width_mm: Option<f32>,
}

/// Why a panel cannot be laid out.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum LayoutError {
    /// Each side must be between 240 and 4096 pixels.
    #[error("panel {width_px}x{height_px} is outside 240x240..=4096x4096 pixels")]
    UnsupportedSize {
        /// Width in pixels.
        width_px: u32,
        /// Height in pixels.
        height_px: u32,
    },
    /// A physical width must be a positive number of millimetres.
    #[error("panel width of {width_mm} mm is not a positive length")]
    InvalidWidth {
        /// The width given.
        width_mm: f32,
    },
}

/// A tappable area of a screen and what tapping it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Where the control is drawn and where it reacts, in panel pixels.
    pub rect: Rectangle,
    /// What a tap inside `rect` asks for.
    pub action: Action,
}

/// The geometry of every screen on one panel.
///
/// Rectangles are computed once in [`Layout::new`]; [`render`](crate::render) draws into them
/// and [`Layout::hit`] tests taps against the same [`Layout::controls`], so what the visitor
/// sees is exactly what reacts.
#[derive(Debug, Clone)]
pub struct Layout {
    panel: Panel,
    px_per_mm: Option<f32>,
    pub(crate) fonts: Fonts,
    /// Side of a plain keyboard key, in pixels.
    pub(crate) key_px: u32,
    /// Thickness of box borders, in pixels.
    pub(crate) stroke: u32,
    pub(crate) attract: AttractRegions,
    pub(crate) prompt: PromptRegions,
    pub(crate) progress: ProgressRegions,
    pub(crate) generating: GeneratingRegions,
    pub(crate) result: ResultRegions,
    pub(crate) error: ErrorRegions,
}

/// The typefaces chosen for this panel's size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fonts {
    /// Prompts, captions, status lines.
    pub(crate) body: Typeface,
    /// Hints and headlines.
    pub(crate) title: Typeface,
    /// Key caps and button labels.
    pub(crate) label: Typeface,
}

#[derive(Debug, Clone)]
pub(crate) struct AttractRegions {
    /// The whole screen: the hint alone when there is no last picture.
    pub(crate) hint_alone: Rectangle,
    pub(crate) image: Rectangle,
    pub(crate) hint: Rectangle,
}

#[derive(Debug, Clone)]
pub(crate) struct PromptRegions {
    /// The bordered box around the prompt.
    pub(crate) text_box: Rectangle,
    /// Inside the border, where the characters go.
    pub(crate) text: Rectangle,
    pub(crate) done: Rectangle,
    /// Unshifted keys and their rectangles.
    pub(crate) keys: Vec<(Key, Rectangle)>,
}

#[derive(Debug, Clone)]
pub(crate) struct ProgressRegions {
    pub(crate) header: Rectangle,
    pub(crate) image: Rectangle,
    pub(crate) status: Rectangle,
    pub(crate) bar: Rectangle,
}

/// A preview in progress: the progress screen above a button row whose first button, where
/// the preview screen has its own, stops the preview and goes back to editing.
#[derive(Debug, Clone)]
pub(crate) struct GeneratingRegions {
    pub(crate) progress: ProgressRegions,
    pub(crate) edit: Rectangle,
}

#[derive(Debug, Clone)]
pub(crate) struct ResultRegions {
    pub(crate) image: Rectangle,
    pub(crate) caption: Rectangle,
    pub(crate) buttons: [Rectangle; 3],
}

#[derive(Debug, Clone)]
pub(crate) struct ErrorRegions {
    pub(crate) title: Rectangle,
    pub(crate) message: Rectangle,
    pub(crate) button: Rectangle,
}

/// Spacing that grows with the panel.
#[derive(Debug, Clone, Copy)]
struct Spacing {
    /// Around the screen's edge.
    margin: u32,
    /// Between neighbouring boxes and keys.
    gap: u32,
    /// Between a box's border and its text.
    pad: u32,
}

impl Layout {
    /// Lays out every screen for `panel`.
    ///
    /// Designed for 320x240 SPI panels up to 1920x1080 HDMI, portrait or landscape; larger
    /// panels work too. When the physical width is known, keys get at least [`MIN_KEY_MM`]
    /// when ten of them fit across, and otherwise the largest size that fits.
    pub fn new(panel: Panel) -> Result<Self, LayoutError> {
        let sides = 240..=4096;
        if !sides.contains(&panel.width_px) || !sides.contains(&panel.height_px) {
            return Err(LayoutError::UnsupportedSize {
                width_px: panel.width_px,
                height_px: panel.height_px,
            });
        }
        let px_per_mm = match panel.width_mm {
            Some(mm) if mm.is_finite() && mm > 0.0 => Some(panel.width_px as f32 / mm),
            Some(width_mm) => return Err(LayoutError::InvalidWidth { width_mm }),
            None => None,
        };
        let short = panel.width_px.min(panel.height_px);
        let space = Spacing {
            margin: (short / 40).max(4),
            gap: (short / 120).max(2),
            pad: (short / 80).max(3),
        };
        let content = Rectangle::new(
            Point::new(space.margin as i32, space.margin as i32),
            Size::new(
                panel.width_px - 2 * space.margin,
                panel.height_px - 2 * space.margin,
            ),
        );
        let (body, title) = text_faces(short);
        let pitch = key_pitch(content.size, body, space, px_per_mm);
        let key_px = pitch.saturating_sub(space.gap);
        let fonts = Fonts {
            body,
            title,
            label: label_face(key_px, pitch * 3 / 2 - space.gap),
        };
        let button_height = key_px;
        Ok(Self {
            panel,
            px_per_mm,
            fonts,
            key_px,
            stroke: (short / 240).max(1),
            attract: attract_regions(content, &fonts, space),
            prompt: prompt_regions(content, pitch, space),
            progress: progress_regions(content, &fonts, space, short),
            generating: generating_regions(content, &fonts, space, short, button_height),
            result: result_regions(content, &fonts, space, button_height),
            error: error_regions(content, &fonts, space, button_height),
        })
    }

    /// The panel this layout was made for.
    pub fn panel(&self) -> Panel {
        self.panel
    }

    /// Side of a plain keyboard key, in pixels.
    pub fn key_size_px(&self) -> u32 {
        self.key_px
    }

    /// Side of a plain keyboard key in millimetres, when the panel's physical width is known.
    ///
    /// Below [`MIN_KEY_MM`] when the panel is too small for ten such keys across: this is the
    /// size the visitor actually gets, not the target.
    pub fn key_size_mm(&self) -> Option<f32> {
        self.px_per_mm
            .map(|px_per_mm| self.key_px as f32 / px_per_mm)
    }

    /// The bordered box the prompt is typed into; its text never leaves this box.
    pub fn prompt_text_box(&self) -> Rectangle {
        self.prompt.text_box
    }

    /// The tappable areas of `screen`, in drawing order.
    pub fn controls(&self, screen: &Screen) -> Vec<Control> {
        let control = |rect, action| Control { rect, action };
        match screen {
            Screen::Attract { .. } => vec![control(self.panel_rect(), Action::StartSession)],
            Screen::PromptEntry { shift, .. } => {
                let keys =
                    self.prompt.keys.iter().map(|&(key, rect)| {
                        control(rect, Action::Key(keyboard::shifted(key, *shift)))
                    });
                keys.chain([control(self.prompt.done, Action::Key(Key::Done))])
                    .collect()
            }
            // The session cancels a running preview and edits; a refinement runs to its end.
            Screen::Generating { .. } => vec![control(self.generating.edit, Action::EditPrompt)],
            Screen::Refining { .. } => Vec::new(),
            Screen::Preview { .. } => {
                self.result_buttons([Action::EditPrompt, Action::NewSeed, Action::Finalize])
            }
            Screen::Final { .. } => {
                self.result_buttons([Action::ThumbsUp, Action::ThumbsDown, Action::NewPicture])
            }
            Screen::Error { .. } => vec![control(self.error.button, Action::StartOver)],
        }
    }

    /// What a tap at `point` on `screen` asks for; `None` when it hits no control.
    pub fn hit(&self, screen: &Screen, point: Point) -> Option<Action> {
        self.controls(screen)
            .into_iter()
            .find(|control| control.rect.contains(point))
            .map(|control| control.action)
    }

    fn panel_rect(&self) -> Rectangle {
        Rectangle::new(
            Point::zero(),
            Size::new(self.panel.width_px, self.panel.height_px),
        )
    }

    fn result_buttons(&self, actions: [Action; 3]) -> Vec<Control> {
        self.result
            .buttons
            .iter()
            .zip(actions)
            .map(|(&rect, action)| Control { rect, action })
            .collect()
    }
}

/// Body and title typefaces by the panel's short side: readable from arm's length on a 2.4"
/// SPI panel and from a step back on a 1080p screen.
fn text_faces(short_side: u32) -> (Typeface, Typeface) {
    let title = |scale| Typeface::new(&FONT_9X18_BOLD, scale);
    match short_side {
        ..400 => (Typeface::new(&FONT_7X13, 1), title(1)),
        400..700 => (Typeface::new(&FONT_10X20, 1), title(2)),
        700..1000 => (Typeface::new(&FONT_9X15, 2), title(3)),
        _ => (Typeface::new(&FONT_10X20, 2), title(4)),
    }
}

/// The largest label typeface whose glyphs take at most half a key's height and whose
/// five-letter labels ("Shift", "Clear") fit a wide key.
fn label_face(key_px: u32, wide_key_px: u32) -> Typeface {
    const CANDIDATES: [Typeface; 7] = [
        Typeface::new(&FONT_5X8, 1),
        Typeface::new(&FONT_6X10, 1),
        Typeface::new(&FONT_7X13, 1),
        Typeface::new(&FONT_9X15, 1),
        Typeface::new(&FONT_10X20, 1),
        Typeface::new(&FONT_10X20, 2),
        Typeface::new(&FONT_10X20, 3),
    ];
    CANDIDATES
        .into_iter()
        .rev()
        .find(|face| face.line_height() * 2 <= key_px && face.advance() * 5 + 2 <= wide_key_px)
        .unwrap_or(CANDIDATES[0])
}

/// Distance from one key to the next (key plus gap), in pixels.
///
/// The keyboard would like three fifths of the height; it takes more to reach
/// [`MIN_KEY_MM`], but never more than ten keys across or than leaves two lines of prompt.
fn key_pitch(content: Size, body: Typeface, space: Spacing, px_per_mm: Option<f32>) -> u32 {
    let rows = keyboard::ROW_COUNT;
    let comfortable = content.height * 3 / 5 / rows;
    let min_touch = px_per_mm.map_or(0, |p| (MIN_KEY_MM * p).ceil() as u32 + space.gap);
    let min_text = body.line_height() * 2 + 2 * space.pad + space.gap;
    let widest = content.width / keyboard::COLUMNS;
    let tallest = content.height.saturating_sub(min_text) / rows;
    comfortable.max(min_touch).min(widest).min(tallest)
}

fn attract_regions(content: Rectangle, fonts: &Fonts, space: Spacing) -> AttractRegions {
    let mut stack = Stack::new(content, space.gap);
    let hint = stack.bottom(fonts.title.line_height() * 2);
    AttractRegions {
        hint_alone: content,
        image: stack.rest(),
        hint,
    }
}

/// The keyboard sits at the bottom, centered; above it the prompt box and, at its bottom
/// right, the done button, both aligned with the keyboard's edges.
fn prompt_regions(content: Rectangle, pitch: u32, space: Spacing) -> PromptRegions {
    let kb_size = Size::new(
        pitch * keyboard::COLUMNS - space.gap,
        pitch * keyboard::ROW_COUNT - space.gap,
    );
    let mut stack = Stack::new(content, space.gap);
    let kb_band = stack.bottom(kb_size.height);
    let keyboard = centered(kb_band, kb_size);
    let above = stack.rest();
    let above = Rectangle::new(
        Point::new(keyboard.top_left.x, above.top_left.y),
        Size::new(keyboard.size.width, above.size.height),
    );
    let done_size = Size::new(
        3 * pitch - space.gap,
        (pitch - space.gap).min(above.size.height),
    );
    let done = Rectangle::new(above.top_left + above.size - done_size, done_size);
    let text_box = Rectangle::new(
        above.top_left,
        Size::new(
            above.size.width - done_size.width - space.gap,
            above.size.height,
        ),
    );
    PromptRegions {
        text_box,
        text: text_box.offset(-(space.pad as i32)),
        done,
        keys: keyboard::place(keyboard.top_left, pitch, space.gap),
    }
}

fn progress_regions(
    content: Rectangle,
    fonts: &Fonts,
    space: Spacing,
    short_side: u32,
) -> ProgressRegions {
    let mut stack = Stack::new(content, space.gap);
    let header = stack.top(fonts.body.line_height() * 2);
    let bar = stack.bottom((short_side / 30).max(6));
    let status = stack.bottom(fonts.body.line_height());
    ProgressRegions {
        header,
        image: stack.rest(),
        status,
        bar,
    }
}

fn generating_regions(
    content: Rectangle,
    fonts: &Fonts,
    space: Spacing,
    short_side: u32,
    button_height: u32,
) -> GeneratingRegions {
    let mut stack = Stack::new(content, space.gap);
    let row = stack.bottom(button_height);
    let [edit, _, _] = columns(row, space.gap);
    GeneratingRegions {
        progress: progress_regions(stack.rest(), fonts, space, short_side),
        edit,
    }
}

fn result_regions(
    content: Rectangle,
    fonts: &Fonts,
    space: Spacing,
    button_height: u32,
) -> ResultRegions {
    let mut stack = Stack::new(content, space.gap);
    let row = stack.bottom(button_height);
    let caption = stack.bottom(fonts.body.line_height() * 2);
    ResultRegions {
        image: stack.rest(),
        caption,
        buttons: columns(row, space.gap),
    }
}

fn error_regions(
    content: Rectangle,
    fonts: &Fonts,
    space: Spacing,
    button_height: u32,
) -> ErrorRegions {
    let mut stack = Stack::new(content, space.gap);
    let title = stack.top(fonts.title.line_height() * 2);
    let row = stack.bottom(button_height);
    let width = (content.size.width / 3).max(fonts.label.width_of("Start over") + 4 * space.pad);
    ErrorRegions {
        title,
        message: stack.rest(),
        button: centered(row, Size::new(width, button_height)),
    }
}
