//! The Linux framebuffer backend (`/dev/fb0`): an embedded-graphics `DrawTarget` that draws into
//! a back buffer in the panel's pixel format and copies it into the memory-mapped framebuffer on
//! [`Framebuffer::flush`] (whole frames, no tearing from the UI's clear-and-draw).
//!
//! There is no maintained embedded-graphics 0.8 fbdev crate, hence this small one. Most of the
//! kiosk's `unsafe` lives here: the two `ioctl`s that read the panel geometry and the `mmap` of
//! the device, each with its SAFETY argument (the other is `evdev`'s axis-range `ioctl`).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::path::Path;

use embedded_graphics::Pixel;
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Size};
use memmap2::{MmapMut, MmapOptions};

/// How the panel stores a pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 16 bits: 5 red, 6 green, 5 blue, little-endian (SPI TFTs, many HDMI fb setups).
    Rgb565,
    /// 32 bits: blue, green, red, unused, little-endian (the usual DRM fbdev emulation).
    Xrgb8888,
}

impl PixelFormat {
    /// Bytes per pixel.
    pub fn bytes(self) -> usize {
        match self {
            Self::Rgb565 => 2,
            Self::Xrgb8888 => 4,
        }
    }

    fn write(self, color: Rgb888, out: &mut [u8]) {
        match self {
            Self::Rgb565 => {
                let v = (u16::from(color.r() >> 3) << 11)
                    | (u16::from(color.g() >> 2) << 5)
                    | u16::from(color.b() >> 3);
                out.copy_from_slice(&v.to_le_bytes());
            }
            Self::Xrgb8888 => out.copy_from_slice(&[color.b(), color.g(), color.r(), 0]),
        }
    }
}

/// The panel geometry: what the driver reports, or what a test gives for a stand-in file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Visible width in pixels.
    pub width: u32,
    /// Visible height in pixels.
    pub height: u32,
    /// Bytes from one line to the next (at least `width * bytes per pixel`).
    pub stride: usize,
    /// Pixel format.
    pub format: PixelFormat,
}

/// Why the framebuffer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FbError {
    /// Opening or mapping the device failed.
    #[error("{path}: {source}")]
    Io {
        /// The device or file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The panel uses a pixel format this backend does not write.
    #[error("{path}: {bits} bits per pixel is not supported (16 = RGB565, 32 = XRGB8888)")]
    Format {
        /// The device.
        path: String,
        /// What the driver reported.
        bits: u32,
    },
    /// The geometry does not fit the mapped memory.
    #[error(
        "{path}: {width}x{height} with stride {stride} needs {needed} bytes, the device has {len}"
    )]
    TooSmall {
        /// The device.
        path: String,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Stride.
        stride: usize,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
}

/// A memory-mapped Linux framebuffer.
pub struct Framebuffer {
    map: MmapMut,
    back: Vec<u8>,
    geometry: Geometry,
}

impl std::fmt::Debug for Framebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framebuffer")
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

/// `struct fb_var_screeninfo` of `<linux/fb.h>`: 40 `u32`s; only the first 7 are read.
#[repr(C)]
struct VarScreenInfo {
    fields: [u32; 40],
}

/// `struct fb_fix_screeninfo` of `<linux/fb.h>` (64-bit layout).
#[repr(C)]
struct FixScreenInfo {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    kind: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

const FBIOGET_VSCREENINFO: libc::c_ulong = 0x4600;
const FBIOGET_FSCREENINFO: libc::c_ulong = 0x4602;

/// The panel geometry and the size of the framebuffer memory (`smem_len`) the driver reports.
fn query(file: &std::fs::File, path: &str) -> Result<(Geometry, usize), FbError> {
    use std::os::fd::AsRawFd;
    let io = |source| FbError::Io {
        path: path.into(),
        source,
    };
    let mut var = VarScreenInfo { fields: [0; 40] };
    // SAFETY: FBIOGET_VSCREENINFO writes one `struct fb_var_screeninfo` (160 bytes, 40 u32s on
    // every Linux ABI) into the pointer, which points at a live value of exactly that size. The
    // fd is open for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FBIOGET_VSCREENINFO as _, &mut var) };
    if rc != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let mut fix = FixScreenInfo {
        id: [0; 16],
        smem_start: 0,
        smem_len: 0,
        kind: 0,
        type_aux: 0,
        visual: 0,
        xpanstep: 0,
        ypanstep: 0,
        ywrapstep: 0,
        line_length: 0,
        mmio_start: 0,
        mmio_len: 0,
        accel: 0,
        capabilities: 0,
        reserved: [0; 2],
    };
    // SAFETY: as above, for FBIOGET_FSCREENINFO and `struct fb_fix_screeninfo`, whose C layout
    // `FixScreenInfo` reproduces field for field with `repr(C)`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FBIOGET_FSCREENINFO as _, &mut fix) };
    if rc != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let (width, height, bits) = (var.fields[0], var.fields[1], var.fields[6]);
    let format = match bits {
        16 => PixelFormat::Rgb565,
        32 => PixelFormat::Xrgb8888,
        bits => {
            return Err(FbError::Format {
                path: path.into(),
                bits,
            });
        }
    };
    let geometry = Geometry {
        width,
        height,
        stride: fix.line_length as usize,
        format,
    };
    Ok((geometry, fix.smem_len as usize))
}

impl Framebuffer {
    /// Opens and maps `path`. With `geometry` `None` the driver is asked (a real `/dev/fbN`);
    /// a regular file standing in for one must be given its geometry.
    pub fn open(path: &Path, geometry: Option<Geometry>) -> Result<Self, FbError> {
        let name = path.display().to_string();
        let io = |source| FbError::Io {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        // A character device's size is not its file length (`fstat` says 0 for /dev/fb0): the
        // driver tells how much memory it has. A regular file standing in for one has its length.
        let (geometry, len) = match geometry {
            Some(g) => {
                let meta = file.metadata().map_err(io)?;
                let len = if meta.is_file() {
                    usize::try_from(meta.len()).unwrap_or(usize::MAX)
                } else {
                    g.stride * g.height as usize
                };
                (g, len)
            }
            None => query(&file, &name)?,
        };
        let needed = geometry.stride * geometry.height as usize;
        let row = geometry.width as usize * geometry.format.bytes();
        if len < needed || geometry.stride < row {
            return Err(FbError::TooSmall {
                path: name,
                width: geometry.width,
                height: geometry.height,
                stride: geometry.stride,
                needed,
                len,
            });
        }
        // SAFETY: the mapping is shared with the device (or file) and only this process writes
        // to it; nothing in this process truncates the file while it is mapped, and the slice
        // lives as long as `MmapMut`, which `Framebuffer` owns. Its length, `needed`, is within
        // what the driver (or the file's length) says the memory holds, so no access faults.
        let map = unsafe { MmapOptions::new().len(needed).map_mut(&file) }.map_err(io)?;
        Ok(Self {
            back: vec![0; needed],
            map,
            geometry,
        })
    }

    /// The panel geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Shows a whole RGB8 frame of the panel's size (from the headless display the UI drew on).
    pub fn present(&mut self, frame: &diffusionx_ui::HeadlessDisplay) {
        let Geometry {
            width,
            height,
            stride,
            format,
        } = self.geometry;
        let size = frame.size();
        let (w, h) = (
            width.min(size.width) as usize,
            height.min(size.height) as usize,
        );
        let rgb = frame.pixels();
        let bytes = format.bytes();
        for y in 0..h {
            for x in 0..w {
                let p = &rgb[(y * size.width as usize + x) * 3..][..3];
                let at = y * stride + x * bytes;
                format.write(
                    Rgb888::new(p[0], p[1], p[2]),
                    &mut self.back[at..at + bytes],
                );
            }
        }
        self.flush();
    }

    /// Copies the back buffer's visible pixels to the panel, line by line (the padding at the
    /// end of each line belongs to the driver).
    pub fn flush(&mut self) {
        let Geometry {
            width,
            stride,
            format,
            ..
        } = self.geometry;
        let row = width as usize * format.bytes();
        for (dst, src) in self.map.chunks_mut(stride).zip(self.back.chunks(stride)) {
            dst[..row].copy_from_slice(&src[..row]);
        }
    }
}

impl OriginDimensions for Framebuffer {
    fn size(&self) -> Size {
        Size::new(self.geometry.width, self.geometry.height)
    }
}

impl DrawTarget for Framebuffer {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let Geometry {
            width,
            height,
            stride,
            format,
        } = self.geometry;
        let bytes = format.bytes();
        for Pixel(point, color) in pixels {
            let (Ok(x), Ok(y)) = (u32::try_from(point.x), u32::try_from(point.y)) else {
                continue;
            };
            if x >= width || y >= height {
                continue;
            }
            let at = y as usize * stride + x as usize * bytes;
            format.write(color, &mut self.back[at..at + bytes]);
        }
        Ok(())
    }
}
