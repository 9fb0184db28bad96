//! Drawing a [`Screen`] into the rectangles of a [`Layout`].

use embedded_graphics::Drawable;
use embedded_graphics::draw_target::DrawTarget;
use embedded_graphics::geometry::{Point, Size};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::primitives::{
    Primitive, PrimitiveStyle, PrimitiveStyleBuilder, Rectangle, RoundedRectangle,
};

use crate::layout::{Layout, ProgressRegions, centered};
use crate::text::{self, Align, Typeface};
use crate::{Action, FinalPath, Key, RefineStatus, RgbImage, Screen};

/// Colors of the kiosk: light text on a dark background, readable in a bright hall.
mod palette {
    use embedded_graphics::pixelcolor::Rgb888;

    pub(super) const BACKGROUND: Rgb888 = Rgb888::new(16, 20, 28);
    pub(super) const SURFACE: Rgb888 = Rgb888::new(32, 38, 50);
    pub(super) const BORDER: Rgb888 = Rgb888::new(90, 100, 120);
    pub(super) const TEXT: Rgb888 = Rgb888::new(236, 239, 244);
    pub(super) const MUTED: Rgb888 = Rgb888::new(150, 158, 172);
    pub(super) const KEY: Rgb888 = Rgb888::new(52, 60, 78);
    pub(super) const PRESSED: Rgb888 = Rgb888::new(120, 180, 255);
    pub(super) const LATCHED: Rgb888 = Rgb888::new(236, 178, 64);
    pub(super) const ACCENT: Rgb888 = Rgb888::new(48, 118, 232);
    /// Progress of work on this kiosk, so a local fallback looks different from the cloud.
    pub(super) const LOCAL: Rgb888 = Rgb888::new(236, 150, 40);
    pub(super) const ALERT: Rgb888 = Rgb888::new(244, 100, 100);
}

/// Draws the whole of `screen` on `target`, starting from a cleared background.
pub fn render<D>(screen: &Screen, layout: &Layout, target: &mut D) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    target.clear(palette::BACKGROUND)?;
    match screen {
        Screen::Attract { hint, last } => attract(target, layout, hint, last.as_ref()),
        Screen::PromptEntry {
            text,
            cursor_visible,
            shift,
            pressed,
            notice,
        } => {
            prompt_text(target, layout, text, *cursor_visible, notice.as_deref())?;
            keyboard(target, layout, screen, *shift, *pressed)
        }
        Screen::Generating {
            prompt,
            step,
            total,
            preview,
            round,
        } => {
            let progress = Progress {
                header: format!("Round {round}: {prompt}"),
                status: format!("Step {step}/{total}"),
                done: (*step, *total),
                color: palette::ACCENT,
            };
            progress_screen(
                target,
                &layout.generating.progress,
                layout.fonts.body,
                preview.as_ref(),
                &progress,
            )?;
            action_buttons(target, layout, screen, |_| palette::ACCENT)
        }
        Screen::Refining { image, status } => progress_screen(
            target,
            &layout.progress,
            layout.fonts.body,
            image.as_ref(),
            &refine_progress(*status),
        ),
        Screen::Preview {
            prompt,
            image,
            round,
            seed,
        } => {
            let caption = [prompt.clone(), format!("Round {round} \u{b7} seed {seed}")];
            result_screen(target, layout, screen, image, &caption)
        }
        Screen::Final { image, path } => {
            let caption = match path {
                FinalPath::Cloud => "Refined in the cloud",
                FinalPath::Local => "Refined on this kiosk",
            };
            result_screen(target, layout, screen, image, &[caption.to_owned()])
        }
        Screen::Error { title, message } => error_screen(target, layout, screen, title, message),
    }
}

fn attract<D>(
    target: &mut D,
    layout: &Layout,
    hint: &str,
    last: Option<&RgbImage>,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let regions = &layout.attract;
    let hint_area = match last {
        Some(image) => {
            draw_image(target, image, regions.image)?;
            regions.hint
        }
        None => regions.hint_alone,
    };
    let face = layout.fonts.title;
    let lines = text::fit(hint, hint_area, face);
    text::draw_lines(
        target,
        &lines,
        hint_area,
        face,
        palette::TEXT,
        Align::Center,
    )
}

/// The prompt box: the text typed so far, its last lines when it is long, and the cursor.
fn prompt_text<D>(
    target: &mut D,
    layout: &Layout,
    prompt: &str,
    cursor_visible: bool,
    notice: Option<&str>,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let regions = &layout.prompt;
    let face = layout.fonts.body;
    boxed(target, regions.text_box, palette::SURFACE, layout.stroke)?;
    let mut area = regions.text;
    if let Some(notice) = notice {
        // The notice takes the last line of the box; the prompt keeps the rest.
        let line = face.line_height().min(area.size.height);
        let notice_area = Rectangle::new(
            area.top_left + Point::new(0, (area.size.height - line) as i32),
            Size::new(area.size.width, line),
        );
        let lines = text::fit(notice, notice_area, face);
        text::draw_lines(
            target,
            &lines,
            notice_area,
            face,
            palette::ALERT,
            Align::TopLeft,
        )?;
        area.size.height -= line;
    }
    if prompt.is_empty() {
        let lines = text::fit("Type what you want to see", area, face);
        text::draw_lines(target, &lines, area, face, palette::MUTED, Align::TopLeft)?;
    }
    let columns = face.columns(area.size.width);
    let lines = text::wrap(prompt, columns);
    let (cursor_row, cursor_column) = cursor_cell(&lines, prompt, columns);
    // Keep the cursor's line in view: the visitor types at the end.
    let first = (cursor_row + 1).saturating_sub(face.rows(area.size.height).max(1));
    let visible = lines.get(first..).unwrap_or_default();
    text::draw_lines(target, visible, area, face, palette::TEXT, Align::TopLeft)?;
    if cursor_visible {
        let cell = Point::new(
            (cursor_column as u32 * face.advance()) as i32,
            ((cursor_row - first) as u32 * face.line_height()) as i32,
        );
        let bar = Size::new((face.advance() / 5).max(2), face.line_height());
        fill(
            target,
            Rectangle::new(area.top_left + cell, bar),
            palette::TEXT,
        )?;
    }
    Ok(())
}

/// Row and column where the next character will appear.
///
/// Wrapping drops a trailing space, but the visitor just typed it and must see the cursor move.
fn cursor_cell(lines: &[String], prompt: &str, columns: usize) -> (usize, usize) {
    let last = lines.len().saturating_sub(1);
    let mut column = lines.last().map_or(0, |line| line.chars().count());
    if column > 0 && prompt.ends_with(char::is_whitespace) {
        column += 1;
    }
    if column >= columns {
        (last + 1, 0)
    } else {
        (last, column)
    }
}

fn keyboard<D>(
    target: &mut D,
    layout: &Layout,
    screen: &Screen,
    shift: bool,
    pressed: Option<Key>,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    for control in layout.controls(screen) {
        let Action::Key(key) = control.action else {
            continue;
        };
        let color = match key {
            _ if pressed.is_some_and(|p| p.same_key(key)) => palette::PRESSED,
            Key::Done => palette::ACCENT,
            Key::Shift if shift => palette::LATCHED,
            _ => palette::KEY,
        };
        let mut buffer = [0; 4];
        let label = match key {
            Key::Char(c) => c.encode_utf8(&mut buffer),
            Key::Backspace => "Del",
            Key::Space => "Space",
            Key::Shift => "Shift",
            Key::Clear => "Clear",
            Key::Done => "Preview",
        };
        button(target, layout, control.rect, label, color)?;
    }
    Ok(())
}

/// What a progress screen says and how far along it is.
struct Progress {
    header: String,
    status: String,
    /// Steps done and steps in total.
    done: (u16, u16),
    color: Rgb888,
}

fn refine_progress(status: RefineStatus) -> Progress {
    let (header, status, done, color) = match status {
        RefineStatus::Connecting => (
            "Connecting to the cloud refiner".to_owned(),
            String::new(),
            (0, 0),
            palette::ACCENT,
        ),
        RefineStatus::Queued { position, wait_ms } => (
            "Waiting for the cloud refiner".to_owned(),
            queue_status(position, wait_ms),
            (0, 0),
            palette::ACCENT,
        ),
        RefineStatus::Cloud { step, total } => (
            "Refining in the cloud".to_owned(),
            step_status(step, total),
            (step, total),
            palette::ACCENT,
        ),
        RefineStatus::Local { step, total } => (
            "Refining on this kiosk".to_owned(),
            step_status(step, total),
            (step, total),
            palette::LOCAL,
        ),
    };
    Progress {
        header,
        status,
        done,
        color,
    }
}

/// The visitor's place in the cloud queue.
///
/// The gateway sends the number of jobs *ahead* of this one (0 = next, `docs/protocol.md`
/// section 6.1); the visitor reads their own place, so 0 is "next" and 3 is "4th".
fn queue_status(position: u32, wait_ms: u32) -> String {
    let place = match position {
        0 => "You are next".to_owned(),
        1 => "1 picture ahead of you".to_owned(),
        ahead => format!("{ahead} pictures ahead of you"),
    };
    match wait_ms.div_ceil(1000) {
        // An estimate of no wait says nothing the visitor can use.
        0 => place,
        seconds => format!("{place}, about {seconds} s"),
    }
}

/// Steps done out of the total; before the refiner knows its step count (a local fallback
/// encodes the prompt first) it says it is starting rather than "Step 0/0".
fn step_status(step: u16, total: u16) -> String {
    if total == 0 {
        "Starting...".to_owned()
    } else {
        format!("Step {step}/{total}")
    }
}

fn progress_screen<D>(
    target: &mut D,
    regions: &ProgressRegions,
    face: Typeface,
    image: Option<&RgbImage>,
    progress: &Progress,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    paragraph(
        target,
        &progress.header,
        regions.header,
        face,
        palette::TEXT,
    )?;
    match image {
        Some(image) => draw_image(target, image, regions.image)?,
        None => fill(target, regions.image, palette::SURFACE)?,
    }
    paragraph(
        target,
        &progress.status,
        regions.status,
        face,
        palette::MUTED,
    )?;
    fill(target, regions.bar, palette::SURFACE)?;
    let (step, total) = progress.done;
    let filled = if total == 0 {
        0
    } else {
        u64::from(regions.bar.size.width) * u64::from(step.min(total)) / u64::from(total)
    };
    let filled = Size::new(filled as u32, regions.bar.size.height);
    fill(
        target,
        Rectangle::new(regions.bar.top_left, filled),
        progress.color,
    )
}

fn result_screen<D>(
    target: &mut D,
    layout: &Layout,
    screen: &Screen,
    image: &RgbImage,
    caption: &[String],
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let regions = &layout.result;
    let face = layout.fonts.body;
    draw_image(target, image, regions.image)?;
    // One line each, so a long prompt cannot push the round and seed out of view.
    let line_height = face.line_height();
    for (row, line) in (0u32..).zip(caption) {
        let top = regions.caption.top_left + Point::new(0, (row * line_height) as i32);
        let area = Rectangle::new(top, Size::new(regions.caption.size.width, line_height));
        let lines = text::fit(line, area, face);
        text::draw_lines(target, &lines, area, face, palette::MUTED, Align::Center)?;
    }
    action_buttons(target, layout, screen, |action| match action {
        Action::Finalize | Action::NewPicture => palette::ACCENT,
        _ => palette::KEY,
    })
}

fn error_screen<D>(
    target: &mut D,
    layout: &Layout,
    screen: &Screen,
    title: &str,
    message: &str,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let regions = &layout.error;
    let (title_face, body_face) = (layout.fonts.title, layout.fonts.body);
    let lines = text::fit(title, regions.title, title_face);
    text::draw_lines(
        target,
        &lines,
        regions.title,
        title_face,
        palette::ALERT,
        Align::Center,
    )?;
    let lines = text::fit(message, regions.message, body_face);
    text::draw_lines(
        target,
        &lines,
        regions.message,
        body_face,
        palette::TEXT,
        Align::Center,
    )?;
    action_buttons(target, layout, screen, |_| palette::ACCENT)
}

/// Draws the screen's controls as labelled buttons, each in the colour `color` picks for its
/// action.
fn action_buttons<D>(
    target: &mut D,
    layout: &Layout,
    screen: &Screen,
    color: impl Fn(Action) -> Rgb888,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    for control in layout.controls(screen) {
        button(
            target,
            layout,
            control.rect,
            action_label(control.action),
            color(control.action),
        )?;
    }
    Ok(())
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::EditPrompt => "Edit prompt",
        Action::NewSeed => "New seed",
        Action::Finalize => "Finalize",
        Action::ThumbsUp => "Thumbs up",
        Action::ThumbsDown => "Thumbs down",
        Action::NewPicture => "New picture",
        Action::StartOver => "Start over",
        Action::Key(_) | Action::StartSession => "",
    }
}

/// A rounded button with its label centered, wrapped onto two lines if it must.
fn button<D>(
    target: &mut D,
    layout: &Layout,
    rect: Rectangle,
    label: &str,
    color: Rgb888,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let radius = (layout.key_px / 8).max(2);
    RoundedRectangle::with_equal_corners(rect, Size::new(radius, radius))
        .into_styled(PrimitiveStyle::with_fill(color))
        .draw(target)?;
    let face = layout.fonts.label;
    let lines = text::fit(label, rect, face);
    text::draw_lines(target, &lines, rect, face, palette::TEXT, Align::Center)
}

/// Text wrapped into `area` from its top-left corner.
fn paragraph<D>(
    target: &mut D,
    text: &str,
    area: Rectangle,
    face: Typeface,
    color: Rgb888,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let lines = text::fit(text, area, face);
    text::draw_lines(target, &lines, area, face, color, Align::TopLeft)
}

fn boxed<D>(target: &mut D, rect: Rectangle, color: Rgb888, stroke: u32) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let style = PrimitiveStyleBuilder::new()
        .fill_color(color)
        .stroke_color(palette::BORDER)
        .stroke_width(stroke)
        .stroke_alignment(embedded_graphics::primitives::StrokeAlignment::Inside)
        .build();
    rect.into_styled(style).draw(target)
}

fn fill<D>(target: &mut D, rect: Rectangle, color: Rgb888) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    target.fill_solid(&rect, color)
}

/// Draws `image` as large as fits in `area`, aspect preserved, centered, nearest neighbour.
fn draw_image<D>(target: &mut D, image: &RgbImage, area: Rectangle) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let (src_w, src_h) = (u64::from(image.width()), u64::from(image.height()));
    let (box_w, box_h) = (u64::from(area.size.width), u64::from(area.size.height));
    if src_w == 0 || src_h == 0 || box_w == 0 || box_h == 0 {
        return fill(target, area, palette::SURFACE);
    }
    // Compare the aspect ratios by cross-multiplying to stay in integers.
    let (dst_w, dst_h) = if src_w * box_h >= src_h * box_w {
        (box_w, (src_h * box_w / src_w).max(1))
    } else {
        ((src_w * box_h / src_h).max(1), box_h)
    };
    let dest = centered(area, Size::new(dst_w as u32, dst_h as u32));
    // Sample each destination pixel's center.
    let source = |d: u64, dst: u64, src: u64| ((2 * d + 1) * src / (2 * dst)) as u32;
    let colors = (0..dst_h).flat_map(|y| {
        let sy = source(y, dst_h, src_h);
        (0..dst_w).map(move |x| {
            image
                .pixel(source(x, dst_w, src_w), sy)
                .expect("sampled coordinates stay below the source size")
        })
    });
    target.fill_contiguous(&dest, colors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_position_is_the_number_of_jobs_ahead() {
        assert_eq!(queue_status(0, 0), "You are next");
        assert_eq!(queue_status(0, 1_500), "You are next, about 2 s");
        assert_eq!(queue_status(1, 900), "1 picture ahead of you, about 1 s");
        assert_eq!(queue_status(3, 4_200), "3 pictures ahead of you, about 5 s");
    }

    #[test]
    fn refiner_with_no_step_count_yet_says_it_is_starting() {
        let local = refine_progress(RefineStatus::Local { step: 0, total: 0 });
        assert_eq!(local.status, "Starting...");
        assert_eq!(local.done, (0, 0));
        let cloud = refine_progress(RefineStatus::Cloud { step: 0, total: 0 });
        assert_eq!(cloud.status, "Starting...");
        let stepping = refine_progress(RefineStatus::Local { step: 2, total: 8 });
        assert_eq!(stepping.status, "Step 2/8");
    }
}
