//! The framebuffer backend on a regular file (and a character device) standing in for
//! `/dev/fb0`, through the same mmap path: a whole rendered screen lands in the file in the
//! panel's pixel format, line padding untouched.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use diffusionx_kiosk::fbdev::{FbError, Framebuffer, Geometry, PixelFormat};
use diffusionx_ui::{HeadlessDisplay, Layout, Panel, Screen, render};

const W: u32 = 320;
const H: u32 = 240;

fn screen() -> Screen {
    Screen::Error {
        title: "No connection".into(),
        message: "Refining on this kiosk instead. Ça marche.".into(),
    }
}

/// Renders the screen on both backends; returns the headless pixels and the file's bytes.
fn render_both(format: PixelFormat, stride: usize) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fb0");
    // Padding bytes start as 0xAA so a write past the line's pixels would show.
    std::fs::write(&path, vec![0xAA; stride * H as usize]).unwrap();
    let layout = Layout::new(Panel {
        width_px: W,
        height_px: H,
        width_mm: None,
    })
    .unwrap();
    let mut headless = HeadlessDisplay::new(W, H);
    render(&screen(), &layout, &mut headless).unwrap();
    let mut fb = Framebuffer::open(
        &path,
        Some(Geometry {
            width: W,
            height: H,
            stride,
            format,
        }),
    )
    .unwrap();
    render(&screen(), &layout, &mut fb).unwrap();
    fb.flush();
    drop(fb);
    (headless.pixels().to_vec(), std::fs::read(&path).unwrap())
}

#[test]
fn xrgb8888_holds_the_same_pixels_as_the_headless_display() {
    let stride = W as usize * 4 + 64;
    let (rgb, file) = render_both(PixelFormat::Xrgb8888, stride);
    for y in 0..H as usize {
        for x in 0..W as usize {
            let p = &file[y * stride + x * 4..][..4];
            let q = &rgb[(y * W as usize + x) * 3..][..3];
            assert_eq!(
                [p[2], p[1], p[0], p[3]],
                [q[0], q[1], q[2], 0],
                "pixel {x},{y}"
            );
        }
        assert!(
            file[y * stride + W as usize * 4..(y + 1) * stride]
                .iter()
                .all(|b| *b == 0xAA)
        );
    }
    // The screen is not blank: several colours made it through.
    let distinct: std::collections::HashSet<&[u8]> = rgb.chunks(3).collect();
    assert!(distinct.len() > 2);
}

#[test]
fn rgb565_packs_five_six_five_little_endian() {
    let stride = W as usize * 2;
    let (rgb, file) = render_both(PixelFormat::Rgb565, stride);
    for (i, q) in rgb.chunks(3).enumerate() {
        let v = u16::from_le_bytes([file[i * 2], file[i * 2 + 1]]);
        let expected =
            (u16::from(q[0] >> 3) << 11) | (u16::from(q[1] >> 2) << 5) | u16::from(q[2] >> 3);
        assert_eq!(v, expected, "pixel {i}");
    }
}

#[test]
fn a_file_too_small_for_the_geometry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fb0");
    std::fs::write(&path, vec![0; 1000]).unwrap();
    let error = Framebuffer::open(
        &path,
        Some(Geometry {
            width: W,
            height: H,
            stride: W as usize * 2,
            format: PixelFormat::Rgb565,
        }),
    )
    .unwrap_err();
    assert!(
        matches!(
            error,
            FbError::TooSmall {
                needed: 153_600,
                len: 1000,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn asking_a_regular_file_for_its_geometry_fails_with_the_driver_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fb0");
    std::fs::write(&path, vec![0; 1000]).unwrap();
    let error = Framebuffer::open(&path, None).unwrap_err();
    let FbError::Io { source, .. } = &error else {
        panic!("{error}");
    };
    // ENOTTY: the ioctl went through the real FBIOGET_VSCREENINFO path.
    assert_eq!(source.raw_os_error(), Some(25), "{error}");
}

/// A framebuffer is a character device, whose `fstat` length is 0: the mapping's length must
/// come from the geometry (the driver's `smem_len` on a real panel), not from the file. `/dev/zero`
/// is a character device that can be mapped shared and written.
#[test]
fn a_character_device_is_mapped_by_its_geometry_not_its_file_length() {
    let geometry = Geometry {
        width: W,
        height: H,
        stride: W as usize * 4,
        format: PixelFormat::Xrgb8888,
    };
    let path = std::path::Path::new("/dev/zero");
    assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
    let mut fb = Framebuffer::open(path, Some(geometry)).unwrap();
    assert_eq!(fb.geometry(), geometry);
    let layout = Layout::new(Panel {
        width_px: W,
        height_px: H,
        width_mm: None,
    })
    .unwrap();
    render(&screen(), &layout, &mut fb).unwrap();
    fb.flush();
}
