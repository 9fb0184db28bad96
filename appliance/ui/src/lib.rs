//! The kiosk's screens, drawn with embedded-graphics on any display.
//!
//! This crate owns:
//! - [`Screen`]: plain data describing what the kiosk shows, built by the session state
//!   machine in another crate;
//! - [`Layout`]: the geometry of every screen on one [`Panel`], from 320x240 SPI panels to
//!   1080p HDMI, portrait or landscape, with touch keys of at least [`MIN_KEY_MM`] when the
//!   panel's size allows;
//! - [`render`]: drawing a screen on any `DrawTarget<Color = Rgb888>`;
//! - hit testing: [`Layout::hit`] turns a tap into an [`Action`], using the very rectangles
//!   [`render`] drew;
//! - [`undrawable`]: which text the fonts cannot draw, for checking operators' texts early;
//! - [`HeadlessDisplay`]: an in-memory framebuffer backend with PNG output, used by tests,
//!   screenshots and the demo.
//!
//! It never reads a clock (the cursor's blink phase is a field of [`Screen::PromptEntry`]),
//! never touches files or devices (PNG helpers work on byte buffers), starts no threads and
//! holds no session logic: which screen comes next is decided elsewhere.

mod action;
mod headless;
mod image;
mod layout;
mod render;
mod screen;
mod text;

pub use action::{Action, Key};
pub use headless::HeadlessDisplay;
pub use image::{ImageError, PngError, RgbImage};
pub use layout::{Control, Layout, LayoutError, MIN_KEY_MM, Panel};
pub use render::render;
pub use screen::{FinalPath, RefineStatus, Screen};
pub use text::undrawable;
