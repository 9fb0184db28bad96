//! The SPI panel backend against a recording SPI device and data/command pin (the hardware
//! seam of embedded-hal): after the controller's init, a frame goes out as one window write
//! (CASET, RASET, RAMWR) with every pixel in RGB565, big-endian, as the ILI9341 expects.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use diffusionx_kiosk::spi_panel::{Controller, SpiPanelConfig, init_panel};
use diffusionx_ui::{HeadlessDisplay, Layout, Panel, Screen, render};
use embedded_graphics::pixelcolor::raw::{RawData, RawU16};
use embedded_graphics::pixelcolor::{Rgb565, Rgb888};
use embedded_hal::delay::DelayNs;
use embedded_hal::digital::{ErrorType as PinErrorType, OutputPin};
use embedded_hal::spi::{ErrorType, Operation, SpiDevice};

/// What went over the wire: (data/command line high, bytes) per write.
#[derive(Default)]
struct Wire {
    dc: bool,
    writes: Vec<(bool, Vec<u8>)>,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Wire>>);

struct Spi(Shared);
impl ErrorType for Spi {
    type Error = Infallible;
}
impl SpiDevice for Spi {
    fn transaction(&mut self, ops: &mut [Operation<'_, u8>]) -> Result<(), Infallible> {
        let mut wire = self.0.0.lock().unwrap();
        for op in ops {
            if let Operation::Write(bytes) = op {
                let dc = wire.dc;
                wire.writes.push((dc, bytes.to_vec()));
            }
        }
        Ok(())
    }
}

struct Dc(Shared);
impl PinErrorType for Dc {
    type Error = Infallible;
}
impl OutputPin for Dc {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.0.0.lock().unwrap().dc = false;
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), Infallible> {
        self.0.0.lock().unwrap().dc = true;
        Ok(())
    }
}

struct NoDelay;
impl DelayNs for NoDelay {
    fn delay_ns(&mut self, _: u32) {}
}

fn config() -> SpiPanelConfig {
    SpiPanelConfig {
        controller: Controller::Ili9341,
        spidev: "/dev/spidev0.0".into(),
        speed_hz: 32_000_000,
        gpiochip: "/dev/gpiochip0".into(),
        dc: 25,
        reset: None,
        backlight: None,
        width: 320,
        height: 240,
        rotation: 90,
        bgr: false,
        invert_colors: false,
        width_mm: None,
    }
}

/// The commands (with their argument bytes) and the pixel bytes of the last RAMWR.
fn decode(writes: &[(bool, Vec<u8>)]) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
    let mut commands: Vec<(u8, Vec<u8>)> = Vec::new();
    for (dc, bytes) in writes {
        if *dc {
            if let Some(last) = commands.last_mut() {
                last.1.extend_from_slice(bytes);
            }
        } else {
            for b in bytes {
                commands.push((*b, Vec::new()));
            }
        }
    }
    let pixels = commands
        .iter()
        .rev()
        .find(|(c, _)| *c == 0x2c)
        .map(|(_, data)| data.clone())
        .unwrap_or_default();
    (commands, pixels)
}

#[test]
fn a_frame_goes_out_as_one_rgb565_window_write() {
    let wire = Shared::default();
    let mut show = init_panel(
        &config(),
        Spi(wire.clone()),
        Dc(wire.clone()),
        None::<Dc>,
        &mut NoDelay,
    )
    .unwrap();
    let init_writes = wire.0.lock().unwrap().writes.len();
    assert!(init_writes > 0, "the controller was initialized");
    let (init, _) = decode(&wire.0.lock().unwrap().writes);
    assert_eq!(init[0].0, 0x01, "software reset first without a reset pin");
    assert!(init.iter().any(|(c, _)| *c == 0x11), "sleep out");
    assert!(init.iter().any(|(c, _)| *c == 0x29), "display on");

    let layout = Layout::new(Panel {
        width_px: 320,
        height_px: 240,
        width_mm: None,
    })
    .unwrap();
    let mut frame = HeadlessDisplay::new(320, 240);
    let screen = Screen::Error {
        title: "Offline".into(),
        message: "Refining on this kiosk".into(),
    };
    render(&screen, &layout, &mut frame).unwrap();
    show(&frame);

    let writes = wire.0.lock().unwrap().writes[init_writes..].to_vec();
    let (commands, pixels) = decode(&writes);
    let names: Vec<u8> = commands.iter().map(|(c, _)| *c).collect();
    assert_eq!(names, vec![0x2a, 0x2b, 0x2c], "CASET, RASET, RAMWR");
    assert_eq!(commands[0].1, vec![0, 0, 0x01, 0x3f], "columns 0..=319");
    assert_eq!(commands[1].1, vec![0, 0, 0, 0xef], "rows 0..=239");
    assert_eq!(pixels.len(), 320 * 240 * 2);
    let rgb = frame.pixels();
    for (i, px) in pixels.chunks(2).enumerate() {
        let q = &rgb[i * 3..i * 3 + 3];
        // embedded-graphics' own RGB888 -> RGB565 conversion (it rounds).
        let expected = RawU16::from(Rgb565::from(Rgb888::new(q[0], q[1], q[2]))).into_inner();
        assert_eq!(u16::from_be_bytes([px[0], px[1]]), expected, "pixel {i}");
    }
}

#[test]
fn a_size_beyond_the_controller_is_refused() {
    let wire = Shared::default();
    let mut big = config();
    big.width = 480;
    let error = init_panel(&big, Spi(wire.clone()), Dc(wire), None::<Dc>, &mut NoDelay)
        .err()
        .unwrap();
    assert_eq!(
        error.to_string(),
        "panel init: 480x240 does not fit the controller's 240x320"
    );
}
