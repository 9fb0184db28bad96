//! SPI TFT panels (ILI9341, ST7789 class) driven from userspace: spidev and GPIO character
//! devices through linux-embedded-hal, the panel protocol through the `mipidsi` driver crate.
//!
//! The UI draws on the headless display; each frame is converted to RGB565 and sent as one
//! window write (`fill_contiguous`: CASET, RASET, RAMWR and the pixels).

use std::path::PathBuf;

use diffusionx_ui::HeadlessDisplay;
use embedded_graphics::pixelcolor::{Rgb565, Rgb888};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Point};
use embedded_graphics::primitives::Rectangle;
use embedded_hal::delay::DelayNs;
use embedded_hal::digital::OutputPin;
use embedded_hal::spi::SpiDevice;
use mipidsi::Builder;
use mipidsi::interface::SpiInterface;
use mipidsi::models::{ILI9341Rgb565, Model, ST7789};
use mipidsi::options::{ColorInversion, ColorOrder, Orientation, Rotation};

use crate::runner::FrameSink;

/// The panel controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    /// ILI9341 (240x320 native).
    Ili9341,
    /// ST7789 (up to 240x320 native).
    St7789,
}

/// Wiring and geometry of an SPI panel.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiPanelConfig {
    /// The controller.
    pub controller: Controller,
    /// The spidev device (`/dev/spidev0.0`).
    pub spidev: PathBuf,
    /// SPI clock in Hz.
    #[serde(default = "default_speed")]
    pub speed_hz: u32,
    /// The GPIO chip of the pins (`/dev/gpiochip0`).
    #[serde(default = "default_chip")]
    pub gpiochip: PathBuf,
    /// Data/command line offset on that chip.
    pub dc: u32,
    /// Reset line, if wired (else a software reset).
    pub reset: Option<u32>,
    /// Backlight line, if wired (switched on at start-up).
    pub backlight: Option<u32>,
    /// Visible width in pixels after rotation.
    pub width: u16,
    /// Visible height in pixels after rotation.
    pub height: u16,
    /// Clockwise rotation: 0, 90, 180 or 270.
    #[serde(default)]
    pub rotation: u16,
    /// Panels wired BGR.
    #[serde(default)]
    pub bgr: bool,
    /// Panels that need inverted colours (many ST7789 modules).
    #[serde(default)]
    pub invert_colors: bool,
    /// Physical width, for 9 mm touch keys.
    pub width_mm: Option<f32>,
}

fn default_speed() -> u32 {
    32_000_000
}

fn default_chip() -> PathBuf {
    PathBuf::from("/dev/gpiochip0")
}

/// Why the panel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SpiPanelError {
    /// spidev failed.
    #[error("{path}: {message}")]
    Spi {
        /// The device.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A GPIO line could not be requested.
    #[error("{chip} line {line}: {message}")]
    Gpio {
        /// The chip.
        chip: PathBuf,
        /// The line.
        line: u32,
        /// What failed.
        message: String,
    },
    /// The panel did not initialize, or the geometry does not fit the controller.
    #[error("panel init: {0}")]
    Init(String),
}

/// Sends a whole RGB8 frame to `display` as RGB565, row-major, in one window write.
pub fn present<D>(display: &mut D, frame: &HeadlessDisplay) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb565> + OriginDimensions,
{
    let size = frame.size().component_min(display.size());
    let width = frame.size().width as usize;
    let pixels = frame.pixels();
    let colors = (0..size.height as usize).flat_map(move |y| {
        (0..size.width as usize).map(move |x| {
            let p = &pixels[(y * width + x) * 3..][..3];
            Rgb565::from(Rgb888::new(p[0], p[1], p[2]))
        })
    });
    display.fill_contiguous(&Rectangle::new(Point::zero(), size), colors)
}

/// Initializes a panel on `spi` with the `dc` pin (and `reset`, when given) and returns the
/// frame sink that shows the kiosk's frames on it.
pub fn init_panel<SPI, DC, RST>(
    config: &SpiPanelConfig,
    spi: SPI,
    dc: DC,
    reset: Option<RST>,
    delay: &mut impl DelayNs,
) -> Result<FrameSink, SpiPanelError>
where
    SPI: SpiDevice + Send + 'static,
    DC: OutputPin + Send + 'static,
    RST: OutputPin + Send + 'static,
{
    // mipidsi borrows its transfer buffer for the display's lifetime; the panel lives as long
    // as the process, so one small buffer is leaked once.
    let buffer: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let di = SpiInterface::new(spi, dc, buffer);
    match config.controller {
        Controller::Ili9341 => finish(config, Builder::new(ILI9341Rgb565, di), reset, delay),
        Controller::St7789 => finish(config, Builder::new(ST7789, di), reset, delay),
    }
}

fn finish<DI, M, RST>(
    config: &SpiPanelConfig,
    builder: Builder<DI, M, mipidsi::NoResetPin>,
    reset: Option<RST>,
    delay: &mut impl DelayNs,
) -> Result<FrameSink, SpiPanelError>
where
    DI: mipidsi::interface::Interface + Send + 'static,
    M: Model<ColorFormat = Rgb565> + Send + 'static,
    Rgb565: mipidsi::interface::InterfacePixelFormat<DI::Word>,
    RST: OutputPin + Send + 'static,
{
    let rotation = match config.rotation {
        0 => Rotation::Deg0,
        90 => Rotation::Deg90,
        180 => Rotation::Deg180,
        270 => Rotation::Deg270,
        other => return Err(SpiPanelError::Init(format!("rotation {other}"))),
    };
    // mipidsi wants the native (unrotated) size; the config gives the visible one.
    let (w, h) = if rotation == Rotation::Deg90 || rotation == Rotation::Deg270 {
        (config.height, config.width)
    } else {
        (config.width, config.height)
    };
    let (max_w, max_h) = M::FRAMEBUFFER_SIZE;
    if w > max_w || h > max_h {
        return Err(SpiPanelError::Init(format!(
            "{}x{} does not fit the controller's {max_w}x{max_h}",
            config.width, config.height
        )));
    }
    let builder = builder
        .display_size(w, h)
        .orientation(Orientation::new().rotate(rotation))
        .color_order(if config.bgr {
            ColorOrder::Bgr
        } else {
            ColorOrder::Rgb
        })
        .invert_colors(if config.invert_colors {
            ColorInversion::Inverted
        } else {
            ColorInversion::Normal
        });
    let sink: FrameSink = match reset {
        Some(rst) => {
            let mut display = builder
                .reset_pin(rst)
                .init(delay)
                .map_err(|e| SpiPanelError::Init(format!("{e:?}")))?;
            Box::new(move |frame| {
                if let Err(e) = present(&mut display, frame) {
                    tracing::error!(error = ?e, "SPI panel write failed");
                }
            })
        }
        None => {
            let mut display = builder
                .init(delay)
                .map_err(|e| SpiPanelError::Init(format!("{e:?}")))?;
            Box::new(move |frame| {
                if let Err(e) = present(&mut display, frame) {
                    tracing::error!(error = ?e, "SPI panel write failed");
                }
            })
        }
    };
    Ok(sink)
}

/// Opens the spidev device and GPIO lines of `config` and initializes the panel.
pub fn open(config: &SpiPanelConfig) -> Result<FrameSink, SpiPanelError> {
    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    use linux_embedded_hal::spidev::{SpiModeFlags, SpidevOptions};
    use linux_embedded_hal::{CdevPin, Delay, SpidevDevice};

    let spi_err = |e: &dyn std::fmt::Display| SpiPanelError::Spi {
        path: config.spidev.clone(),
        message: e.to_string(),
    };
    let mut spi = SpidevDevice::open(&config.spidev).map_err(|e| spi_err(&e))?;
    spi.0
        .configure(
            &SpidevOptions::new()
                .bits_per_word(8)
                .max_speed_hz(config.speed_hz)
                .mode(SpiModeFlags::SPI_MODE_0)
                .build(),
        )
        .map_err(|e| spi_err(&e))?;
    let mut chip = Chip::new(&config.gpiochip).map_err(|e| SpiPanelError::Gpio {
        chip: config.gpiochip.clone(),
        line: 0,
        message: e.to_string(),
    })?;
    let mut output = |line: u32, initial: u8| -> Result<CdevPin, SpiPanelError> {
        let gpio = |e: &dyn std::fmt::Display| SpiPanelError::Gpio {
            chip: config.gpiochip.clone(),
            line,
            message: e.to_string(),
        };
        let handle = chip
            .get_line(line)
            .and_then(|l| l.request(LineRequestFlags::OUTPUT, initial, "diffusionx-kiosk"))
            .map_err(|e| gpio(&e))?;
        CdevPin::new(handle).map_err(|e| gpio(&e))
    };
    let dc = output(config.dc, 0)?;
    let reset = config.reset.map(|line| output(line, 1)).transpose()?;
    // Requested high (on); released when the sink is dropped.
    let backlight = config.backlight.map(|line| output(line, 1)).transpose()?;
    let mut show = init_panel(config, spi, dc, reset, &mut Delay)?;
    Ok(Box::new(move |frame| {
        let _on = &backlight;
        show(frame);
    }))
}
