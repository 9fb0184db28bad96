//! What the kiosk shows: plain data built by the session state machine.

use crate::{Key, RgbImage};

/// One whole screen of the kiosk, with everything needed to draw it.
///
/// A `Screen` holds no geometry: [`Layout`](crate::Layout) places it on a panel and
/// [`render`](crate::render) draws it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// The idle screen: a big hint and, optionally, the last picture.
    Attract {
        /// The invitation, e.g. "Touch to start".
        hint: String,
        /// The last finished picture, if any.
        last: Option<RgbImage>,
    },
    /// The on-screen keyboard and the prompt typed so far.
    PromptEntry {
        /// The prompt typed so far.
        text: String,
        /// Whether the blinking cursor is in its visible phase.
        cursor_visible: bool,
        /// Whether letter keys type capitals.
        shift: bool,
        /// The key under the visitor's finger, drawn highlighted.
        pressed: Option<Key>,
        /// Why the prompt was not accepted (e.g. a blocked word), drawn under it.
        notice: Option<String>,
    },
    /// A preview is being drawn on the kiosk.
    Generating {
        /// The prompt being drawn.
        prompt: String,
        /// Denoising steps done so far.
        step: u16,
        /// Denoising steps in total.
        total: u16,
        /// The latest intermediate picture, if one was decoded.
        preview: Option<RgbImage>,
        /// Which preview of this session this is, starting at 1.
        round: u32,
    },
    /// A finished preview and what to do with it.
    Preview {
        /// The prompt the preview was drawn from.
        prompt: String,
        /// The preview picture.
        image: RgbImage,
        /// Which preview of this session this is, starting at 1.
        round: u32,
        /// The seed the preview was drawn with.
        seed: u64,
    },
    /// The chosen preview is being refined into the final picture.
    Refining {
        /// The picture being refined, if there is one to show.
        image: Option<RgbImage>,
        /// Where refinement stands.
        status: RefineStatus,
    },
    /// The final picture and the feedback buttons.
    Final {
        /// The final picture.
        image: RgbImage,
        /// Where it was refined.
        path: FinalPath,
    },
    /// Something went wrong; the visitor can only start over.
    Error {
        /// A short headline in plain words.
        title: String,
        /// What happened, in plain words.
        message: String,
    },
}

/// Where refinement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefineStatus {
    /// Reaching the cloud refiner.
    Connecting,
    /// Waiting in the cloud refiner's queue.
    Queued {
        /// Jobs ahead of ours.
        position: u32,
        /// The refiner's estimate of the wait, in milliseconds.
        wait_ms: u32,
    },
    /// Refining in the cloud.
    Cloud {
        /// Steps done so far.
        step: u16,
        /// Steps in total.
        total: u16,
    },
    /// Refining on the kiosk itself, because the cloud was not available.
    Local {
        /// Steps done so far.
        step: u16,
        /// Steps in total.
        total: u16,
    },
}

/// Where the final picture was refined; shown as a caption so a fallback is never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalPath {
    /// Refined by the cloud refiner.
    Cloud,
    /// Refined on this kiosk.
    Local,
}
