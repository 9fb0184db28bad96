//! Touchscreens and keyboards through Linux evdev (`/dev/input/eventN`).
//!
//! The decoders are pure: they take `struct input_event` records and give taps in panel
//! coordinates and key presses. Touch: single-touch (`ABS_X`/`ABS_Y`/`BTN_TOUCH`) and the
//! multitouch protocol B (`ABS_MT_SLOT`, `ABS_MT_TRACKING_ID`, `ABS_MT_POSITION_*`; the first
//! contact is the finger that taps), calibrated from the axis ranges in the configuration and
//! rotated to the panel. Keyboard: US layout, shift held or locked by the on-screen key.
//! Reading the device is a plain file read of 24-byte records on a thread of its own.
//!
//! Where the configuration gives no axis ranges, [`axis_ranges`] asks the device for them
//! (`EVIOCGABS`): the one `unsafe` block of this file, with its SAFETY argument.
#![allow(unsafe_code)]

use std::io::Read;
use std::path::Path;

use diffusionx_ui::Key;
use embedded_graphics::prelude::Point;

/// `EV_SYN`, `EV_KEY`, `EV_ABS`.
const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_ABS: u16 = 3;
const SYN_REPORT: u16 = 0;
const ABS_X: u16 = 0x00;
const ABS_Y: u16 = 0x01;
const ABS_MT_SLOT: u16 = 0x2f;
const ABS_MT_POSITION_X: u16 = 0x35;
const ABS_MT_POSITION_Y: u16 = 0x36;
const ABS_MT_TRACKING_ID: u16 = 0x39;
const BTN_TOUCH: u16 = 0x14a;

/// One `struct input_event` (64-bit layout: 16 bytes of time, type, code, value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    /// `type`.
    pub kind: u16,
    /// `code`.
    pub code: u16,
    /// `value`.
    pub value: i32,
}

/// Bytes of one record.
pub const EVENT_SIZE: usize = 24;

impl InputEvent {
    /// Parses one record (the time is not used).
    pub fn parse(bytes: &[u8; EVENT_SIZE]) -> Self {
        Self {
            kind: u16::from_le_bytes([bytes[16], bytes[17]]),
            code: u16::from_le_bytes([bytes[18], bytes[19]]),
            value: i32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        }
    }

    /// The record for this event (time zero), for tests and replay files.
    pub fn to_bytes(self) -> [u8; EVENT_SIZE] {
        let mut out = [0u8; EVENT_SIZE];
        out[16..18].copy_from_slice(&self.kind.to_le_bytes());
        out[18..20].copy_from_slice(&self.code.to_le_bytes());
        out[20..24].copy_from_slice(&self.value.to_le_bytes());
        out
    }
}

/// How the touch panel's axes map onto the display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Raw X at the panel's left and right edge (as the panel is mounted, before rotation).
    pub x: (i32, i32),
    /// Raw Y at the top and bottom edge.
    pub y: (i32, i32),
    /// Display width and height in pixels (after rotation).
    pub display: (u32, u32),
    /// Clockwise rotation of the display relative to the touch axes: 0, 90, 180 or 270.
    pub rotation: u16,
}

impl Calibration {
    /// The display point for raw `(x, y)`.
    pub fn map(&self, x: i32, y: i32) -> Point {
        let unit = |v: i32, (lo, hi): (i32, i32)| {
            if hi == lo {
                0.0
            } else {
                ((v - lo) as f32 / (hi - lo) as f32).clamp(0.0, 1.0)
            }
        };
        let (u, v) = (unit(x, self.x), unit(y, self.y));
        let (u, v) = match self.rotation {
            90 => (1.0 - v, u),
            180 => (1.0 - u, 1.0 - v),
            270 => (v, 1.0 - u),
            _ => (u, v),
        };
        let (w, h) = self.display;
        let px = |t: f32, n: u32| ((t * n as f32) as i32).min(n as i32 - 1);
        Point::new(px(u, w), px(v, h))
    }
}

/// Turns touch events into taps: a tap is where the first finger was when it lifted.
#[derive(Debug)]
pub struct TouchDecoder {
    calibration: Calibration,
    x: i32,
    y: i32,
    slot: i32,
    /// Tracking id of the contact in slot 0 (the finger that taps), -1 when none.
    contact: i32,
    down: bool,
    was_down: bool,
}

impl TouchDecoder {
    /// A decoder for a panel calibrated as `calibration`.
    pub fn new(calibration: Calibration) -> Self {
        Self {
            calibration,
            x: 0,
            y: 0,
            slot: 0,
            contact: -1,
            down: false,
            was_down: false,
        }
    }

    /// Feeds one event; returns a tap when a report ends a touch.
    pub fn feed(&mut self, e: InputEvent) -> Option<Point> {
        match (e.kind, e.code) {
            (EV_ABS, ABS_X) => self.x = e.value,
            (EV_ABS, ABS_Y) => self.y = e.value,
            (EV_ABS, ABS_MT_SLOT) => self.slot = e.value,
            (EV_ABS, ABS_MT_TRACKING_ID) if self.slot == 0 => {
                self.contact = e.value;
                self.down = e.value >= 0;
            }
            (EV_ABS, ABS_MT_POSITION_X) if self.slot == 0 => self.x = e.value,
            (EV_ABS, ABS_MT_POSITION_Y) if self.slot == 0 => self.y = e.value,
            (EV_KEY, BTN_TOUCH) => self.down = e.value != 0,
            (EV_SYN, SYN_REPORT) => {
                let lifted = self.was_down && !self.down;
                self.was_down = self.down;
                if lifted {
                    return Some(self.calibration.map(self.x, self.y));
                }
            }
            _ => {}
        }
        None
    }
}

/// Turns key events into the kiosk's keys (US layout).
#[derive(Debug, Default)]
pub struct KeyboardDecoder {
    shift: bool,
}

impl KeyboardDecoder {
    /// Feeds one event; returns a key on a press (value 1), and on auto-repeat (value 2) for
    /// keys that edit text (characters, space, backspace). Enter and Escape act once per
    /// press: a held Enter must not start a preview and then cancel it by repeating.
    pub fn feed(&mut self, e: InputEvent) -> Option<Key> {
        if e.kind != EV_KEY {
            return None;
        }
        if matches!(e.code, 42 | 54) {
            self.shift = e.value != 0;
            return None;
        }
        if e.value == 0 {
            return None;
        }
        let key = match e.code {
            14 => Key::Backspace,
            28 | 96 => Key::Done,
            57 => Key::Space,
            1 => Key::Clear,
            code => Key::Char(self.char_of(code)?),
        };
        if e.value == 2 && matches!(key, Key::Done | Key::Clear) {
            return None;
        }
        Some(key)
    }

    fn char_of(&self, code: u16) -> Option<char> {
        const ROWS: [(u16, &str, &str); 4] = [
            (2, "1234567890-", "!@#$%^&*()_"),
            (16, "qwertyuiop", "QWERTYUIOP"),
            (30, "asdfghjkl;'", "ASDFGHJKL:\""),
            (44, "zxcvbnm,./", "ZXCVBNM<>?"),
        ];
        ROWS.iter().find_map(|(first, plain, shifted)| {
            let i = usize::from(code.checked_sub(*first)?);
            let row = if self.shift { shifted } else { plain };
            row.chars().nth(i)
        })
    }
}

/// What an input device gives the kiosk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A finger lifted at this display point.
    Tap(Point),
    /// A key was pressed.
    Key(Key),
}

/// `struct input_absinfo`: value, minimum, maximum, fuzz, flat, resolution.
#[repr(C)]
#[derive(Debug, Default)]
struct AbsInfo {
    fields: [i32; 6],
}

/// `EVIOCGABS(axis)`: `_IOR('E', 0x40 + axis, struct input_absinfo)`.
fn eviocgabs(axis: u16) -> u64 {
    const IOC_READ: u64 = 2;
    (IOC_READ << 30)
        | ((std::mem::size_of::<AbsInfo>() as u64) << 16)
        | (u64::from(b'E') << 8)
        | (0x40 + u64::from(axis))
}

/// Raw `(min, max)` of a touchscreen's X axis and of its Y axis.
pub type AxisRanges = ((i32, i32), (i32, i32));

/// The raw `(min, max)` of a touchscreen's X and Y axes, as its driver reports them: the
/// multitouch axes where it has them (protocol B reports positions there), else `ABS_X` and
/// `ABS_Y`. For a configuration that gives no calibration.
pub fn axis_ranges(path: &Path) -> std::io::Result<AxisRanges> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let range = |axis: u16| -> std::io::Result<Option<(i32, i32)>> {
        let mut info = AbsInfo::default();
        // SAFETY: EVIOCGABS writes one `struct input_absinfo` (six 32-bit integers on every
        // Linux ABI, the size encoded in the request) into the pointer, which points at a live
        // value of exactly that layout. The fd is open for the call's duration.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), eviocgabs(axis) as _, &mut info) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            let what = match error.raw_os_error() {
                // The device has no such axis.
                Some(libc::EINVAL) => return Ok(None),
                Some(libc::ENOTTY) => "is not an evdev device",
                _ => "did not give its axis ranges",
            };
            return Err(std::io::Error::new(
                error.kind(),
                format!("{} {what} ({error})", path.display()),
            ));
        }
        let [_, min, max, ..] = info.fields;
        Ok((max > min).then_some((min, max)))
    };
    let pair =
        |x: u16, y: u16| -> std::io::Result<Option<AxisRanges>> { Ok(range(x)?.zip(range(y)?)) };
    match pair(ABS_MT_POSITION_X, ABS_MT_POSITION_Y)? {
        Some(ranges) => Ok(ranges),
        None => pair(ABS_X, ABS_Y)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} reports no X and Y axes: not a touchscreen",
                    path.display()
                ),
            )
        }),
    }
}

/// Reads `path` (an evdev device, or a file of records) on a thread of its own and sends what
/// the decoders make of it; the thread ends at end of file or when `send` returns false.
pub fn spawn_reader(
    path: &Path,
    mut touch: Option<TouchDecoder>,
    mut send: impl FnMut(Input) -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut file = std::fs::File::open(path)?;
    let name = path.display().to_string();
    std::thread::Builder::new()
        .name(format!("input {name}"))
        .spawn(move || {
            let mut keyboard = KeyboardDecoder::default();
            let mut record = [0u8; EVENT_SIZE];
            loop {
                if let Err(e) = file.read_exact(&mut record) {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        tracing::error!(device = %name, error = %e, "input device failed");
                    }
                    return;
                }
                let event = InputEvent::parse(&record);
                let input = match &mut touch {
                    Some(t) => t.feed(event).map(Input::Tap),
                    None => None,
                }
                .or_else(|| keyboard.feed(event).map(Input::Key));
                if let Some(input) = input
                    && !send(input)
                {
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: u16, code: u16, value: i32) -> InputEvent {
        InputEvent { kind, code, value }
    }

    fn syn() -> InputEvent {
        ev(EV_SYN, SYN_REPORT, 0)
    }

    const CAL: Calibration = Calibration {
        x: (0, 4095),
        y: (0, 4095),
        display: (800, 480),
        rotation: 0,
    };

    #[test]
    fn the_axis_request_is_the_kernels_eviocgabs() {
        // linux/input.h: EVIOCGABS(ABS_X) = 0x80184540, EVIOCGABS(ABS_MT_POSITION_X) = 0x80184575.
        assert_eq!(eviocgabs(ABS_X), 0x8018_4540);
        assert_eq!(eviocgabs(ABS_MT_POSITION_X), 0x8018_4575);
    }

    #[test]
    fn axis_ranges_of_a_file_that_is_no_input_device_are_refused_by_name() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let error = axis_ranges(file.path()).unwrap_err().to_string();
        // The kernel answers ENOTTY; qemu-user (`cargo xtask arm-test`) forwards no evdev
        // request and answers ENOSYS (os error 38) itself.
        if !error.contains("(os error 38)") {
            assert!(error.contains("is not an evdev device"), "{error}");
        }
        assert!(
            error.contains(&file.path().display().to_string()),
            "{error}"
        );
        let missing = axis_ranges(Path::new("/nonexistent/event0")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn records_round_trip() {
        let e = ev(EV_ABS, ABS_MT_POSITION_X, -17);
        assert_eq!(InputEvent::parse(&e.to_bytes()), e);
    }

    #[test]
    fn single_touch_taps_where_the_finger_lifts() {
        let mut t = TouchDecoder::new(CAL);
        let events = [
            ev(EV_KEY, BTN_TOUCH, 1),
            ev(EV_ABS, ABS_X, 1000),
            ev(EV_ABS, ABS_Y, 2000),
            syn(),
            ev(EV_ABS, ABS_X, 2048),
            ev(EV_ABS, ABS_Y, 4095),
            syn(),
            ev(EV_KEY, BTN_TOUCH, 0),
            syn(),
        ];
        let taps: Vec<Point> = events.into_iter().filter_map(|e| t.feed(e)).collect();
        assert_eq!(taps, vec![Point::new(400, 479)]);
    }

    #[test]
    fn multitouch_protocol_b_follows_the_first_contact() {
        let mut t = TouchDecoder::new(CAL);
        let events = [
            ev(EV_ABS, ABS_MT_SLOT, 0),
            ev(EV_ABS, ABS_MT_TRACKING_ID, 7),
            ev(EV_ABS, ABS_MT_POSITION_X, 4095),
            ev(EV_ABS, ABS_MT_POSITION_Y, 0),
            syn(),
            // A second finger in slot 1 moves; it does not move the tap.
            ev(EV_ABS, ABS_MT_SLOT, 1),
            ev(EV_ABS, ABS_MT_TRACKING_ID, 8),
            ev(EV_ABS, ABS_MT_POSITION_X, 10),
            syn(),
            ev(EV_ABS, ABS_MT_SLOT, 0),
            ev(EV_ABS, ABS_MT_TRACKING_ID, -1),
            syn(),
        ];
        let taps: Vec<Point> = events.into_iter().filter_map(|e| t.feed(e)).collect();
        assert_eq!(taps, vec![Point::new(799, 0)]);
    }

    #[test]
    fn calibration_and_rotation_map_the_corners() {
        let raw = Calibration {
            x: (200, 3900),
            y: (300, 3800),
            display: (480, 800),
            rotation: 90,
        };
        // Raw top-left of the touch axes is the display's top-right after a 90 degree turn.
        assert_eq!(raw.map(200, 300), Point::new(479, 0));
        assert_eq!(raw.map(3900, 3800), Point::new(0, 799));
        // Out-of-range raw values clamp to the edge.
        assert_eq!(raw.map(-50, 9000), Point::new(0, 0));
        let upside_down = Calibration {
            rotation: 180,
            ..CAL
        };
        assert_eq!(upside_down.map(0, 0), Point::new(799, 479));
    }

    #[test]
    fn keyboard_types_with_shift_and_named_keys() {
        let mut k = KeyboardDecoder::default();
        let press = |code| ev(EV_KEY, code, 1);
        let release = |code| ev(EV_KEY, code, 0);
        let events = [
            press(42),
            press(35), // h
            release(42),
            press(18), // e
            press(57),
            press(42),
            press(2), // !
            release(42),
            release(2),
            press(14),
            press(28),
        ];
        let keys: Vec<Key> = events.into_iter().filter_map(|e| k.feed(e)).collect();
        assert_eq!(
            keys,
            vec![
                Key::Char('H'),
                Key::Char('e'),
                Key::Space,
                Key::Char('!'),
                Key::Backspace,
                Key::Done
            ]
        );
    }

    #[test]
    fn held_enter_and_escape_act_once_while_held_characters_repeat() {
        let mut k = KeyboardDecoder::default();
        let press = |code| ev(EV_KEY, code, 1);
        let repeat = |code| ev(EV_KEY, code, 2);
        let release = |code| ev(EV_KEY, code, 0);
        let events = [
            press(28), // Enter, held
            repeat(28),
            repeat(28),
            release(28),
            press(96), // keypad Enter, held
            repeat(96),
            release(96),
            press(1), // Escape, held
            repeat(1),
            release(1),
            press(30), // a, held
            repeat(30),
            release(30),
            press(14), // Backspace, held
            repeat(14),
            release(14),
            press(57), // Space, held
            repeat(57),
            release(57),
        ];
        let keys: Vec<Key> = events.into_iter().filter_map(|e| k.feed(e)).collect();
        assert_eq!(
            keys,
            vec![
                Key::Done,
                Key::Done,
                Key::Clear,
                Key::Char('a'),
                Key::Char('a'),
                Key::Backspace,
                Key::Backspace,
                Key::Space,
                Key::Space,
            ]
        );
    }

    #[test]
    fn a_recorded_device_file_is_read_to_its_end() {
        let dir = std::env::temp_dir().join(format!("dx-evdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let path = dir.join("event0");
        let mut bytes = Vec::new();
        for e in [
            ev(EV_KEY, BTN_TOUCH, 1),
            ev(EV_ABS, ABS_X, 4095),
            ev(EV_ABS, ABS_Y, 0),
            syn(),
            ev(EV_KEY, BTN_TOUCH, 0),
            syn(),
            ev(EV_KEY, 30, 1), // a
        ] {
            bytes.extend_from_slice(&e.to_bytes());
        }
        std::fs::write(&path, bytes).ok();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn_reader(&path, Some(TouchDecoder::new(CAL)), move |i| {
            tx.send(i).is_ok()
        });
        let got: Vec<Input> = match handle {
            Ok(h) => {
                let _ = h.join();
                rx.iter().collect()
            }
            Err(e) => panic!("{e}"),
        };
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(
            got,
            vec![Input::Tap(Point::new(799, 0)), Input::Key(Key::Char('a'))]
        );
    }
}
