//! The register tile of the AVX2/FMA kernels ([`crate::attention`]'s x86-64 path): `T` (at
//! most [`MR`]) rows of a packed operand broadcast against [`NR`] columns of another (two
//! 8-wide vectors) per step of the inner size, the classic 6 x 16 tile of an AVX2 matrix
//! product: two 8-wide loads, six broadcasts, twelve FMAs per step, the twelve sums in
//! registers. Measured on a 2-core AMD EPYC (Zen 3), on one thread with its
//! operands in cache: 75-80 GFLOP/s, 83-88% of the 90 its FMA units peak at.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// Rows of a tile: the broadcast operand's.
pub(crate) const MR: usize = 6;
/// Columns of a tile: two 8-wide vectors.
pub(crate) const NR: usize = 16;

/// Whether the CPU runs the tile (AVX2 and FMA).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Where step `t`'s [`NR`] values of the right operand start.
pub(crate) trait Steps: Copy {
    /// # Safety
    /// `t` is a step of the tile's depth.
    unsafe fn at(self, t: usize) -> *const f32;
}

/// A packed panel: step `t` at `b[t * NR..]`.
#[derive(Clone, Copy)]
pub(crate) struct Panel(pub(crate) *const f32);

impl Steps for Panel {
    #[inline(always)]
    unsafe fn at(self, t: usize) -> *const f32 {
        // SAFETY: the caller's step is inside the panel.
        unsafe { self.0.add(t * NR) }
    }
}

/// Values read where they lie: step `t` at `base + offsets[t]` (a convolution's input pixels
/// for one tap of one channel, `NR` output pixels in a row).
#[derive(Clone, Copy)]
pub(crate) struct Gathered {
    pub(crate) base: *const f32,
    pub(crate) offsets: *const u32,
}

impl Steps for Gathered {
    #[inline(always)]
    unsafe fn at(self, t: usize) -> *const f32 {
        // SAFETY: the caller's step has an offset, which keeps NR values inside the input.
        unsafe { self.base.add(*self.offsets.add(t) as usize) }
    }
}

/// `dst` (`rows` x [`NR`], row `r` at `dst[r * stride..]`, its 16 values contiguous) = (or
/// `+=` if `add`) the packed tile `a` (element `(r, t)` at `a[t * MR + r]`) times the packed
/// panel `b` (element `(t, j)` at `b[t * NR + j]`), `t < depth`.
///
/// # Safety
/// `a[..depth * MR]`, `b[..depth * NR]` and `dst[r * stride..r * stride + NR]` for `r < rows`
/// are in bounds, `1 <= rows <= MR`, and the CPU has AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn tile(
    rows: usize,
    a: *const f32,
    b: *const f32,
    depth: usize,
    dst: (*mut f32, usize),
    add: bool,
) {
    // SAFETY: the function's contract.
    unsafe { tile_of(rows, a, Panel(b), depth, dst, add) }
}

/// [`tile`] with the right operand's steps where `b` says ([`Steps`]).
///
/// # Safety
/// As [`tile`]'s, with `b.at(t)[..NR]` in bounds for `t < depth`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn tile_of<B: Steps>(
    rows: usize,
    a: *const f32,
    b: B,
    depth: usize,
    (dst, stride): (*mut f32, usize),
    add: bool,
) {
    // SAFETY: the function's contract, for every T = rows.
    unsafe {
        match rows {
            6 => steps::<6, B>(a, b, depth, dst, stride, add),
            5 => steps::<5, B>(a, b, depth, dst, stride, add),
            4 => steps::<4, B>(a, b, depth, dst, stride, add),
            3 => steps::<3, B>(a, b, depth, dst, stride, add),
            2 => steps::<2, B>(a, b, depth, dst, stride, add),
            _ => steps::<1, B>(a, b, depth, dst, stride, add),
        }
    }
}

/// [`tile_of`] for `T` rows.
///
/// # Safety
/// As [`tile_of`]'s, with `rows` = `T`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn steps<const T: usize, B: Steps>(
    a: *const f32,
    b: B,
    depth: usize,
    dst: *mut f32,
    stride: usize,
    add: bool,
) {
    // SAFETY: the function's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        if add {
            // The destination is read after the steps: fetched now, it arrives meanwhile
            // (rows a page apart, as a convolution's output channels are, would otherwise
            // stall the first steps on misses).
            for row in 0..T {
                let at = dst.add(row * stride).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(at);
                _mm_prefetch::<_MM_HINT_T0>(at.add(NR * size_of::<f32>() - 1));
            }
        }
        for t in 0..depth {
            let bt = b.at(t);
            let b0 = _mm256_loadu_ps(bt);
            let b1 = _mm256_loadu_ps(bt.add(8));
            let at = a.add(t * MR);
            for (row, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*at.add(row));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        if add {
            for (row, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(dst.add(row * stride)));
                acc[1] = _mm256_add_ps(acc[1], _mm256_loadu_ps(dst.add(row * stride + 8)));
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(dst.add(row * stride), acc[0]);
            _mm256_storeu_ps(dst.add(row * stride + 8), acc[1]);
        }
    }
}
