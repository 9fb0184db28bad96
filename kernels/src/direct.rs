//! A stride-1 convolution with weights packed ahead of time whose right operand is read where the
//! input lies: no columns.
//!
//! The banded product writes each band's columns (`in x k x k` rows of the band's pixels: nine
//! times the input for a 3x3 kernel) and then reads them. Here the input is copied once into a
//! zero-bordered buffer (`[in, h + 2p, w + 2p]`), and a tile of [`NR`] output pixels along one
//! output line reads, for each step `(c, dy, dx)` of the inner size, the [`NR`] input pixels of
//! channel `c` that tap `(dy, dx)` of those pixels sees: `NR` consecutive values of one padded
//! line, at an offset per step ([`Gathered`]). The left operand is the packed weights' panels,
//! as in [`crate::matmul_packed`], and the loops are its loops (blocks of [`KC`] steps, [`MC`]
//! rows, `PIXELS` pixels) with no packing at all: each thread takes its share of the output
//! pixels (or of the output channels, when there are more of those) and runs through every
//! block of steps without waiting for the other threads. Output lines must be whole tiles
//! (`wo` a multiple of [`NR`]); AVX2 and FMA only.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::conv::ConvShape;
use crate::packed::{KC, MC, MR, NR, Packed};
use crate::tile::{Gathered, tile_of};

/// Output pixels per block of a thread's share: their input lines for one block of steps stay
/// in the cache (1024 pixels of a 64-pixel-wide image with 28 channels: 133 KB).
const PIXELS: usize = 1024;

/// Whether [`conv`] runs a convolution with `wo` output pixels per line on this CPU.
pub(crate) fn fits(shape: &ConvShape, wo: usize) -> bool {
    let (hp, wp) = (
        shape.height + 2 * shape.padding,
        shape.width + 2 * shape.padding,
    );
    crate::tile::available()
        && wo.is_multiple_of(NR)
        && u32::try_from(shape.channels * hp * wp).is_ok()
}

/// The output pointer, shared by the threads, each writing its own rows and pixels.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the threads write disjoint elements (their shares), and the pointer outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Element `i` (a method, so that closures capture the whole `Out`, not its pointer).
    ///
    /// # Safety
    /// `i` is inside the output.
    unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: the function's contract.
        unsafe { self.0.add(i) }
    }
}

/// `out += weights * columns(img)` for one image `img` (`[in, h, w]`) of `shape`, `out` its
/// `[out, ho, wo]` (holding the bias), on `threads` threads of rayon's pool. `padded` is the
/// caller's buffer for the zero-bordered input.
///
/// The caller checked the lengths against `shape` (`a` is the `[out, in x k x k]` weights
/// packed on the left) and [`fits`].
pub(crate) fn conv(
    img: &[f32],
    shape: &ConvShape,
    a: &Packed,
    out: &mut [f32],
    threads: usize,
    padded: &mut Vec<f32>,
) {
    let (h, w, k, pad) = (shape.height, shape.width, shape.kernel, shape.padding);
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let (ho, wo) = (hp + 1 - k, wp + 1 - k);
    let (channels, m) = (shape.channels, shape.out_channels);
    let depth = channels * k * k;
    let plane = ho * wo;
    assert!(
        img.len() == channels * h * w
            && out.len() == m * plane
            && a.dims() == (m, depth)
            && wo.is_multiple_of(NR)
            && crate::tile::available(),
        "direct::conv's caller checks the shapes and the CPU"
    );
    padded.clear();
    padded.resize(channels * hp * wp, 0.0);
    let copy = |(c, dst): (usize, &mut [f32])| {
        for (y, src) in img[c * h * w..][..h * w].chunks_exact(w).enumerate() {
            dst[(y + pad) * wp + pad..][..w].copy_from_slice(src);
        }
    };
    match threads > 1 {
        true => padded.par_chunks_mut(hp * wp).enumerate().for_each(copy),
        false => padded.chunks_mut(hp * wp).enumerate().for_each(copy),
    }
    let offsets: Vec<u32> = (0..depth)
        .map(|t| {
            let (c, tap) = (t / (k * k), t % (k * k));
            // Below u32::MAX: `fits`.
            (c * hp * wp + (tap / k) * wp + tap % k) as u32
        })
        .collect();
    let tiles = plane / NR;
    let by_pixels = threads > 1 && (plane > m || m.div_ceil(MR) < 2 * threads) && tiles > 1;
    let split = |t: usize, len: usize, unit: usize| {
        let units = len.div_ceil(unit);
        (units * t / threads * unit).min(len)..(units * (t + 1) / threads * unit).min(len)
    };
    let (input, dst) = (padded.as_slice(), Out(out.as_mut_ptr()));
    let task = |t: usize| {
        let (rows, tiles) = match (threads, by_pixels) {
            (1, _) => (0..m, 0..tiles),
            (_, true) => (0..m, split(t, tiles, 1)),
            (_, false) => (split(t, m, MR), 0..tiles),
        };
        for jc in tiles.clone().step_by(PIXELS / NR) {
            let block = jc..(jc + PIXELS / NR).min(tiles.end);
            for pc in (0..depth).step_by(KC) {
                let kc = KC.min(depth - pc);
                let steps = offsets[pc..pc + kc].as_ptr();
                for ic in rows.clone().step_by(MC) {
                    let count = MC.min(rows.end - ic);
                    let pa = a.block(pc, ic, count);
                    for j in block.clone() {
                        let (y, x0) = (j * NR / wo, j * NR % wo);
                        let b = Gathered {
                            base: input[y * wp + x0..].as_ptr(),
                            offsets: steps,
                        };
                        for (ir, panel) in pa.chunks_exact(MR * kc).enumerate() {
                            let rows = MR.min(count - ir * MR);
                            // SAFETY: the panel holds kc steps of MR rows; each step's offset
                            // keeps NR values inside the padded input (line y + dy <= hp - 1,
                            // columns x0 + dx..x0 + dx + NR <= wp); rows ic + ir * MR.. of
                            // output pixels j * NR.. are inside `out` and this task's alone;
                            // the CPU has AVX2 and FMA (asserted).
                            unsafe {
                                let at = dst.at((ic + ir * MR) * plane + j * NR);
                                tile_of(rows, panel.as_ptr(), b, kc, (at, plane), true);
                            }
                        }
                    }
                }
            }
        }
    };
    match threads > 1 {
        true => (0..threads).into_par_iter().for_each(task),
        false => task(0),
    }
}
