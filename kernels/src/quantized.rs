//! `c = a b` in 8-bit integer arithmetic: one operand a layer's weights, quantized once to
//! signed 7-bit values with one scale per output lane ([`Quantized`]); the other the
//! activations, quantized per call to unsigned 8-bit values with one scale and zero point per
//! lane along the inner size (a token's row, a pixel's column).
//!
//! Why: on an AVX2 CPU an f32 product peaks at 16 multiply-adds per cycle and core (two 8-wide
//! FMAs); `vpmaddubsw` multiplies 32 pairs of bytes per instruction, and with `vpmaddwd`
//! folding its 16-bit sums into 32-bit ones the same core does 32 (measured on a Zen 3 EPYC,
//! one thread, operands in cache: 58-86 against 32-46 G multiply-adds per second for the f32
//! tile). `vpmaddubsw` adds two products into a saturating 16-bit lane: with unsigned 8-bit
//! activations (at most 255) the weights must stay within ±64 for `2 x 255 x 64 = 32640` to
//! fit, hence 7-bit weights (onnxruntime's `reduce_range` for the same instruction).
//!
//! The arithmetic: with `a = sa (qa - za)` per activation lane and `w = sw qw` per weight lane,
//! `sum a w = sa sw (sum qa qw - za sum qw)`: the integer sum runs in the register tile (`i32`
//! lanes, exact: a lane sums at most `32640` per four steps), and the correction `za sum qw`
//! uses the weights' sums per block of steps, made once at packing. Each block's exact integer
//! result is scaled into `f32` and added to `c`.
//!
//! Layout: an operand's lanes in panels of the tile's width ([`MR`] rows of `a`, [`NR`] columns
//! of `b`), the steps in groups of four: panel `p`'s element (lane `l`, step `t`) at
//! `p * groups * width * 4 + (t / 4) * width * 4 + l * 4 + t % 4`, so that a tile step reads
//! four steps of one lane of `a` as one 32-bit broadcast and four steps of eight lanes of `b`
//! as one vector. Steps past the inner size are zero in both operands.
//!
//! `unsafe` here: reads and writes through raw pointers inside the extents
//! [`matmul_quantized`] checked, shared between the threads, each writing its own elements of
//! `c`, and the calls into `#[target_feature]` code after the run-time check.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::matmul::{MatmulMismatch, Matrix, MatrixMut, check};
use crate::packed::{MR, NR, Side};

/// Steps per group: one 32-bit lane of `vpmaddubsw`'s operands.
const GROUP: usize = 4;
/// Groups per block of steps: a panel of `b` over a block is 16 KiB (L1).
const GC: usize = 256;
/// Rows of `a` per block: 144 rows over a block of steps, 144 KiB (L2).
const MC: usize = 144;
/// The largest magnitude of a weight: `2 x 255 x 64` fits `vpmaddubsw`'s 16-bit lanes.
pub const WEIGHT_LEVELS: i32 = 64;

/// A weight matrix for one side of [`matmul_quantized`], its output lanes (a left operand's
/// rows, a right operand's columns) quantized symmetrically to `-64..=64` with one scale each.
#[derive(Clone, PartialEq)]
pub struct Quantized {
    side: Side,
    /// Output lanes and steps (the inner size).
    lanes: usize,
    depth: usize,
    /// The panels (module doc).
    data: Vec<i8>,
    /// Per lane (rounded up to whole panels, zero past `lanes`): the scale of a value.
    scales: Vec<f32>,
    /// Per block of [`GC`] groups, per lane (rounded up as `scales`): the sum of the values.
    sums: Vec<i32>,
}

impl std::fmt::Debug for Quantized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quantized")
            .field("side", &self.side)
            .field("dims", &self.dims())
            .finish_non_exhaustive()
    }
}

impl Quantized {
    /// `x` quantized for `side`: each output lane (a row for [`Side::Left`], a column for
    /// [`Side::Right`]) to `round(v * 64 / max |v|)` with scale `max |v| / 64`.
    pub fn new(x: Matrix<'_>, side: Side) -> Result<Quantized, MatmulMismatch> {
        check(&x)?;
        let (lanes, depth, lane_stride, step_stride) = lanes_of(&x, side);
        let value = |l: usize, t: usize| x.data[l * lane_stride + t * step_stride];
        let scales: Vec<f32> = (0..lanes)
            .map(|l| (0..depth).map(|t| value(l, t).abs()).fold(0f32, f32::max) / 64.0)
            .collect();
        let quantized = |l: usize, t: usize| quantize_weight(value(l, t), scales[l]);
        Ok(Quantized::pack(
            side,
            (lanes, depth),
            scales.clone(),
            quantized,
        ))
    }

    /// Weights already quantized to 8 bits (an int8 model's: `values` row-major, `rows x
    /// columns` as the product reads them, one `scales` entry per output lane), requantized to
    /// the 7 bits of [`WEIGHT_LEVELS`]: per lane `round(q * 64 / max |q|)` (halves away from
    /// zero), scale `scale * max |q| / 64`.
    pub fn from_int8(
        values: &[i8],
        scales: &[f32],
        (rows, columns): (usize, usize),
        side: Side,
    ) -> Result<Quantized, MatmulMismatch> {
        if rows.checked_mul(columns) != Some(values.len()) {
            return Err(MatmulMismatch("int8 values that are not rows x columns"));
        }
        let (lanes, depth, lane_stride, step_stride) = match side {
            Side::Left => (rows, columns, columns, 1),
            Side::Right => (columns, rows, 1, columns),
        };
        if scales.len() != lanes {
            return Err(MatmulMismatch("not one scale per output lane"));
        }
        let value = |l: usize, t: usize| values[l * lane_stride + t * step_stride];
        let largest: Vec<i32> = (0..lanes)
            .map(|l| {
                (0..depth)
                    .map(|t| i32::from(value(l, t)).abs())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let new_scales = scales
            .iter()
            .zip(&largest)
            .map(|(s, &q)| s * q as f32 / 64.0)
            .collect();
        Ok(Quantized::pack(side, (lanes, depth), new_scales, |l, t| {
            // round(q * 64 / max), halves away from zero, in integers (exact).
            let (max, q) = (largest[l], i32::from(value(l, t)) * WEIGHT_LEVELS);
            match max {
                0 => 0,
                _ => ((2 * q + q.signum() * max) / (2 * max)) as i8,
            }
        }))
    }

    fn pack(
        side: Side,
        (lanes, depth): (usize, usize),
        mut scales: Vec<f32>,
        value: impl Fn(usize, usize) -> i8,
    ) -> Quantized {
        let width = width(side);
        let padded = lanes.next_multiple_of(width);
        let groups = depth.div_ceil(GROUP);
        let blocks = groups.div_ceil(GC).max(1);
        let mut data = vec![0i8; padded * groups * GROUP];
        let mut sums = vec![0i32; blocks * padded];
        for l in 0..lanes {
            let panel = l / width * groups * width * GROUP;
            for t in 0..depth {
                let q = value(l, t);
                data[panel + t / GROUP * width * GROUP + l % width * GROUP + t % GROUP] = q;
                sums[t / (GC * GROUP) * padded + l] += i32::from(q);
            }
        }
        scales.resize(padded, 0.0);
        Quantized {
            side,
            lanes,
            depth,
            data,
            scales,
            sums,
        }
    }

    /// Which operand of the product it is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// `(rows, columns)` of the matrix it holds.
    pub fn dims(&self) -> (usize, usize) {
        self.side.dims(self.lanes, self.depth)
    }

    /// Bytes it holds in memory.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.sums.len())
    }

    /// Element `(lane, step)` as the product reads it: the 7-bit value times its scale.
    pub fn value(&self, lane: usize, step: usize) -> f32 {
        let width = width(self.side);
        let groups = self.depth.div_ceil(GROUP);
        let at = lane / width * groups * width * GROUP
            + step / GROUP * width * GROUP
            + lane % width * GROUP
            + step % GROUP;
        f32::from(self.data[at]) * self.scales[lane]
    }
}

fn width(side: Side) -> usize {
    match side {
        Side::Left => MR,
        Side::Right => NR,
    }
}

fn quantize_weight(v: f32, scale: f32) -> i8 {
    if scale > 0.0 {
        (v / scale)
            .round_ties_even()
            .clamp(-WEIGHT_LEVELS as f32, WEIGHT_LEVELS as f32) as i8
    } else {
        0
    }
}

/// `(lanes, depth, lane stride, step stride)` of `x` read as `side`'s operand.
fn lanes_of(x: &Matrix<'_>, side: Side) -> (usize, usize, usize, usize) {
    match side {
        Side::Left => (x.rows, x.columns, x.row_stride, x.column_stride),
        Side::Right => (x.columns, x.rows, x.column_stride, x.row_stride),
    }
}

/// One activation lane's quantization: `q = clamp(round(v / scale) + zero, 0, 255)`, with the
/// lane's range widened to hold 0 (so that 0 is exact) and `scale = (max - min) / 255`
/// (1 for a lane of zeros). Values that are not finite make the scale NaN or infinite, which
/// carries into the lane's outputs.
pub(crate) fn activation_scale(min: f32, max: f32) -> (f32, i32) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = (max - min) / 255.0;
    if scale == 0.0 {
        return (1.0, 0);
    }
    let zero = (-min / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    (scale, zero)
}

/// The smallest and largest of `values` (with 0) and whether all are finite.
fn range(values: &[f32]) -> (f32, f32, bool) {
    let (mut lo, mut hi, mut bad) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (((lo, hi), bad), &v) in lo.iter_mut().zip(&mut hi).zip(&mut bad).zip(chunk) {
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
            *bad += v * 0.0;
        }
    }
    let mut out = (0f32, 0f32, true);
    for &v in chunks.remainder().iter().chain(&lo).chain(&hi) {
        out = (out.0.min(v), out.1.max(v), out.2 && v.is_finite());
    }
    (out.0, out.1, out.2 && bad.iter().all(|v| v.is_finite()))
}

/// `out[i]` = `values[i]` quantized with `(inverse, zero)` ([`quantize_activation`]).
fn quantize_line(values: &[f32], (inverse, zero): (f32, i32), out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::tile::available() {
        // SAFETY: the CPU has AVX2.
        unsafe { avx2::quantize(values, (Coefficients::All(inverse, zero), out)) };
        return;
    }
    for (q, &v) in out.iter_mut().zip(values) {
        *q = quantize_activation(v, inverse, zero);
    }
}

/// `out[i]` = `values[i]` quantized with `(inverses[i], zeros[i])`.
fn quantize_lanes(values: &[f32], (inverses, zeros): (&[f32], &[i32]), out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::tile::available() {
        // SAFETY: the CPU has AVX2.
        unsafe { avx2::quantize(values, (Coefficients::Each(inverses, zeros), out)) };
        return;
    }
    for (((q, &v), &inverse), &zero) in out.iter_mut().zip(values).zip(inverses).zip(zeros) {
        *q = quantize_activation(v, inverse, zero);
    }
}

/// `dst[4 j + s] = rows[s][j]`: four steps of sixteen lanes as each lane's four codes in a row.
fn interleave16(rows: [&[u8; NR]; GROUP], dst: &mut [u8; NR * GROUP]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64; the loads read 16 bytes of each row and the stores
        // write the 64 bytes of `dst`.
        unsafe {
            let [r0, r1, r2, r3] = rows.map(|r| _mm_loadu_si128(r.as_ptr().cast()));
            let (a_lo, a_hi) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (b_lo, b_hi) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let out = dst.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(out, _mm_unpacklo_epi16(a_lo, b_lo));
            _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(a_lo, b_lo));
            _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(a_hi, b_hi));
            _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(a_hi, b_hi));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (j, four) in dst.chunks_exact_mut(GROUP).enumerate() {
        for (s, code) in four.iter_mut().enumerate() {
            *code = rows[s][j];
        }
    }
}

/// The quantization's coefficients: one pair for all values, or one per value.
#[derive(Clone, Copy)]
enum Coefficients<'a> {
    All(f32, i32),
    Each(&'a [f32], &'a [i32]),
}

/// A lane's codes, four steps at a time, to where `slot(group)` says in `data`.
fn scatter(line: &[u8], slot: impl Fn(usize) -> usize, data: &mut [u8]) {
    let mut fours = line.chunks_exact(GROUP);
    for (g, four) in (&mut fours).enumerate() {
        let at = slot(g);
        data[at..at + GROUP].copy_from_slice(four);
    }
    let rest = fours.remainder();
    if !rest.is_empty() {
        let at = slot(line.len() / GROUP);
        data[at..at + rest.len()].copy_from_slice(rest);
    }
}

/// One activation: `clamp(round(v * inverse) + zero, 0, 255)`.
#[inline]
fn quantize_activation(v: f32, inverse: f32, zero: i32) -> u8 {
    ((v * inverse).round_ties_even() + zero as f32).clamp(0.0, 255.0) as u8
}

/// The activation operand packed per call: its panels (module doc), per lane scale and zero
/// point (rounded up to whole panels: scale 0, zero point 0).
struct Activations {
    data: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
}

/// Quantizes and packs `x`'s lanes (`x` read as `side`'s operand) on `threads` threads, each
/// a run of whole panels, reading `x` in the order it lies in memory.
fn pack_activations(x: &Matrix<'_>, side: Side, threads: usize) -> Activations {
    let (lanes, depth, _, _) = lanes_of(x, side);
    let width = width(side);
    let panels = lanes.div_ceil(width);
    let panel_len = depth.div_ceil(GROUP) * width * GROUP;
    let mut data = vec![0u8; panels * panel_len];
    let mut scales = vec![0f32; panels * width];
    let mut zeros = vec![0i32; panels * width];
    let tasks = if threads > 1 { threads.min(panels) } else { 1 };
    let per_task = panels.div_ceil(tasks);
    let parts = data
        .chunks_mut(per_task * panel_len)
        .zip(scales.chunks_mut(per_task * width))
        .zip(zeros.chunks_mut(per_task * width))
        .enumerate()
        .map(|(i, ((d, s), z))| {
            (
                i * per_task * width,
                Lanes {
                    data: d,
                    scales: s,
                    zeros: z,
                },
            )
        });
    let pack = |(first, part): (usize, Lanes<'_>)| {
        let count = part.scales.len().min(lanes - first);
        pack_lanes(x, side, first, count, part);
    };
    if tasks > 1 {
        parts.collect::<Vec<_>>().into_par_iter().for_each(pack);
    } else {
        parts.for_each(pack);
    }
    Activations {
        data,
        scales,
        zeros,
    }
}

/// One task's share of [`pack_activations`]: whole panels' bytes, scales and zero points.
struct Lanes<'a> {
    data: &'a mut [u8],
    scales: &'a mut [f32],
    zeros: &'a mut [i32],
}

/// Packs lanes `first..first + count` of `x` into `out` (their panels from the first).
fn pack_lanes(x: &Matrix<'_>, side: Side, first: usize, count: usize, out: Lanes<'_>) {
    let (_, depth, lane_stride, step_stride) = lanes_of(x, side);
    let width = width(side);
    let panel_len = depth.div_ceil(GROUP) * width * GROUP;
    // Where lane w's four steps of group g go in `out.data`.
    let slot = |w: usize, g: usize| w / width * panel_len + g * width * GROUP + w % width * GROUP;
    let finish = |(min, max, finite): (f32, f32, bool)| {
        let (scale, zero) = activation_scale(min, max);
        // A lane with a value that is not finite gives NaN outputs, not a silent zero.
        (if finite { scale } else { f32::NAN }, zero)
    };
    if step_stride != 1 && lane_stride == 1 && count > 0 {
        // Each step's lanes contiguous (a row-major right operand): step by step, four at a
        // time, each lane's four codes written together.
        let step = |t: usize| &x.data[t * step_stride + first..][..count];
        let (mut lo, mut hi, mut bad) = (vec![0f32; count], vec![0f32; count], vec![0f32; count]);
        for t in 0..depth {
            for (((lo, hi), bad), &v) in lo.iter_mut().zip(&mut hi).zip(&mut bad).zip(step(t)) {
                *lo = if v < *lo { v } else { *lo };
                *hi = if v > *hi { v } else { *hi };
                // NaN from then on if v is not finite (infinity times 0 is NaN).
                *bad += v * 0.0;
            }
        }
        let mut inverses = vec![0f32; count];
        for w in 0..count {
            let (scale, zero) = finish((lo[w], hi[w], bad[w] == 0.0));
            (out.scales[w], out.zeros[w], inverses[w]) = (scale, zero, 1.0 / scale);
        }
        let zeros = &out.zeros[..count];
        let mut lines = vec![0u8; GROUP * count];
        for g in 0..depth.div_ceil(GROUP) {
            let steps = GROUP.min(depth - g * GROUP);
            for (s, line) in lines.chunks_exact_mut(count).enumerate() {
                if s < steps {
                    quantize_lanes(step(g * GROUP + s), (&inverses, zeros), line);
                } else {
                    line.fill(0);
                }
            }
            let rows = [0, 1, 2, 3].map(|s| &lines[s * count..(s + 1) * count]);
            let mut w = 0;
            // Whole panels of 16 lanes: their four steps are 64 bytes in a row.
            while width == NR && w + NR <= count {
                let lanes = rows.map(|r| <&[u8; NR]>::try_from(&r[w..w + NR]).expect("16 lanes"));
                let at = slot(w, g);
                let dst = <&mut [u8; NR * GROUP]>::try_from(&mut out.data[at..at + NR * GROUP])
                    .expect("64 bytes");
                interleave16(lanes, dst);
                w += NR;
            }
            for w in w..count {
                let four = rows.map(|r| r[w]);
                out.data[slot(w, g)..][..GROUP].copy_from_slice(&four);
            }
        }
    } else {
        // Lane by lane: each lane's steps where they lie when contiguous (a row-major left
        // operand), else gathered first.
        let mut line = vec![0u8; depth];
        let mut gathered = vec![0f32; if step_stride == 1 { 0 } else { depth }];
        for w in 0..count {
            let start = (first + w) * lane_stride;
            let lane = if step_stride == 1 {
                &x.data[start..][..depth]
            } else {
                for (t, v) in gathered.iter_mut().enumerate() {
                    *v = x.data[start + t * step_stride];
                }
                &gathered[..]
            };
            let (scale, zero) = finish(range(lane));
            (out.scales[w], out.zeros[w]) = (scale, zero);
            quantize_line(lane, (1.0 / scale, zero), &mut line);
            scatter(&line, |g| slot(w, g), out.data);
        }
    }
}

/// `c = w x` (`w` on the left) or `c = x w` (on the right), or `c +=` with `accumulate`, on
/// `threads` threads of rayon's pool: `x` quantized per call (module doc). `c`'s elements must
/// be distinct; the product is fastest with `c`'s columns contiguous.
pub fn matmul_quantized(
    x: Matrix<'_>,
    w: &Quantized,
    c: MatrixMut<'_>,
    accumulate: bool,
    threads: usize,
) -> Result<(), MatmulMismatch> {
    check(&x)?;
    let (m, k, n) = match w.side {
        Side::Left => (w.lanes, w.depth, x.columns),
        Side::Right => (x.rows, w.depth, w.lanes),
    };
    let x_depth = match w.side {
        Side::Left => x.rows,
        Side::Right => x.columns,
    };
    if x_depth != k || c.rows != m || c.columns != n {
        return Err(MatmulMismatch("the operands' sizes do not fit"));
    }
    let Some(c) = crate::matmul::output_to_write(c, k, accumulate)? else {
        return Ok(());
    };
    let threads = threads.max(1);
    let x_side = match w.side {
        Side::Left => Side::Right,
        Side::Right => Side::Left,
    };
    let packed = pack_activations(&x, x_side, threads);
    let c = Out {
        ptr: c.data.as_mut_ptr(),
        rs: c.row_stride,
        cs: c.column_stride,
    };
    // SAFETY: c's extent was checked, its elements are distinct and it aliases neither input
    // (borrowed mutably for the call); m, n, k > 0 and the operands have these sizes.
    unsafe { product((m, n, k), w, &packed, c, accumulate, threads) };
    Ok(())
}

/// `c`: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

// SAFETY: the threads write disjoint elements of `c` (see `product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One side's panels as the tiles read them: panel `p`'s groups from `g0` at
/// `data[p * panel_len + g0 * width * 4..]`, its lanes' scales and (per block) offsets.
#[derive(Clone, Copy)]
struct Panels<'a> {
    data: &'a [u8],
    panel_len: usize,
    scales: &'a [f32],
    offsets: &'a [i32],
}

/// # Safety
/// `c`'s elements `(i, j)`, `i < m`, `j < n` are inside its extent, distinct, and alias
/// neither operand; `w` and `x` have these sizes; `m`, `n`, `k` > 0.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    w: &Quantized,
    x: &Activations,
    c: Out,
    accumulate: bool,
    threads: usize,
) {
    let groups = k.div_ceil(GROUP);
    let blocks = groups.div_ceil(GC);
    let padded = w.scales.len();
    // SAFETY: i8 and u8 have the same size and alignment.
    let w_data = unsafe { std::slice::from_raw_parts(w.data.as_ptr().cast::<u8>(), w.data.len()) };
    let by_columns = threads > 1 && (n > m || m.div_ceil(MR) < 2 * threads) && n > NR;
    let split = |t: usize, len: usize, unit: usize| {
        let units = len.div_ceil(unit);
        (units * t / threads * unit).min(len)..(units * (t + 1) / threads * unit).min(len)
    };
    for block in 0..blocks {
        let g0 = block * GC;
        let gc = GC.min(groups - g0);
        let w_side = Panels {
            data: w_data,
            panel_len: groups * width(w.side) * GROUP,
            scales: &w.scales,
            offsets: &w.sums[block * padded..][..padded],
        };
        let x_side = Panels {
            data: &x.data,
            panel_len: groups * width(other(w.side)) * GROUP,
            scales: &x.scales,
            offsets: &x.zeros,
        };
        let (a, b) = match w.side {
            Side::Left => (w_side, x_side),
            Side::Right => (x_side, w_side),
        };
        let weights_left = w.side == Side::Left;
        let add = accumulate || block > 0;
        let task = |t: usize| {
            let (rows, columns) = match (threads, by_columns) {
                (1, _) => (0..m, 0..n),
                (_, true) => (0..m, split(t, n, NR)),
                (_, false) => (split(t, m, MR), 0..n),
            };
            for ic in rows.clone().step_by(MC) {
                let mc = MC.min(rows.end - ic);
                for jr in (columns.start..columns.end).step_by(NR) {
                    let width = NR.min(columns.end - jr);
                    for ir in (ic..ic + mc).step_by(MR) {
                        let height = MR.min(ic + mc - ir);
                        // SAFETY: the tile's rows and columns are inside c's extent and this
                        // task's alone; the panels hold gc groups from g0.
                        unsafe {
                            tile(
                                (a, b, weights_left),
                                (ir, jr, g0, gc),
                                (height, width),
                                c,
                                add,
                            )
                        };
                    }
                }
            }
        };
        if threads > 1 {
            (0..threads).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Left => Side::Right,
        Side::Right => Side::Left,
    }
}

/// The tile of rows `ir..ir + height` and columns `jr..jr + width` over groups `g0..g0 + gc`:
/// `c (+)= sa_i sb_j (sum qa qb - oa_i ob_j)`.
///
/// # Safety
/// As `product`'s, for this tile.
unsafe fn tile(
    (a, b, weights_left): (Panels<'_>, Panels<'_>, bool),
    (ir, jr, g0, gc): (usize, usize, usize, usize),
    (height, width): (usize, usize),
    c: Out,
    add: bool,
) {
    let pa = &a.data[ir / MR * a.panel_len + g0 * MR * GROUP..][..gc * MR * GROUP];
    let pb = &b.data[jr / NR * b.panel_len + g0 * NR * GROUP..][..gc * NR * GROUP];
    let mut acc = [[0i32; NR]; MR];
    #[cfg(target_arch = "x86_64")]
    if crate::tile::available() {
        // SAFETY: the CPU has AVX2; the panels hold gc groups.
        unsafe { avx2::sums(height, (pa, pb, gc), weights_left, &mut acc) };
        if width == NR && c.cs == 1 {
            let rows = (&a.scales[ir..][..height], &a.offsets[ir..][..height]);
            let columns = (&b.scales[jr..][..NR], &b.offsets[jr..][..NR]);
            // SAFETY: the CPU has AVX2; rows ir..ir + height of c hold NR values from jr
            // (contract, width NR, contiguous columns).
            unsafe { avx2::finish(&acc, rows, columns, (c.ptr.add(ir * c.rs + jr), c.rs), add) };
            return;
        }
    } else {
        sums(height, (pa, pb, gc), weights_left, &mut acc);
    }
    #[cfg(not(target_arch = "x86_64"))]
    sums(height, (pa, pb, gc), weights_left, &mut acc);
    for (r, row) in acc.iter().enumerate().take(height) {
        let (sa, oa) = (a.scales[ir + r], a.offsets[ir + r]);
        for (j, &sum) in row.iter().enumerate().take(width) {
            let (sb, ob) = (b.scales[jr + j], b.offsets[jr + j]);
            let exact = i64::from(sum) - i64::from(oa) * i64::from(ob);
            let value = sa * sb * exact as f32;
            // SAFETY: (ir + r, jr + j) is inside c's extent and this task's (contract).
            let slot = unsafe { &mut *c.ptr.add((ir + r) * c.rs + (jr + j) * c.cs) };
            *slot = if add { *slot + value } else { value };
        }
    }
}

/// The integer sums of a tile in plain code.
fn sums(
    height: usize,
    (pa, pb, gc): (&[u8], &[u8], usize),
    weights_left: bool,
    acc: &mut [[i32; NR]; MR],
) {
    for g in 0..gc {
        let at = &pa[g * MR * GROUP..][..MR * GROUP];
        let bt = &pb[g * NR * GROUP..][..NR * GROUP];
        for (r, row) in acc.iter_mut().enumerate().take(height) {
            for (j, sum) in row.iter_mut().enumerate() {
                for s in 0..GROUP {
                    let (x, y) = (at[r * GROUP + s], bt[j * GROUP + s]);
                    *sum += if weights_left {
                        i32::from(x as i8) * i32::from(y)
                    } else {
                        i32::from(x) * i32::from(y as i8)
                    };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GROUP, MR, NR};

    /// The integer sums of a tile: per group, one 32-bit broadcast of four steps of each row of
    /// `a`, two vectors of four steps of eight columns of `b`, `vpmaddubsw` (the unsigned
    /// activations first) and `vpmaddwd` by ones into 32-bit sums.
    ///
    /// # Safety
    /// The CPU has AVX2; `pa` and `pb` hold `gc` groups; `height <= MR`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sums(
        height: usize,
        (pa, pb, gc): (&[u8], &[u8], usize),
        weights_left: bool,
        acc: &mut [[i32; NR]; MR],
    ) {
        debug_assert!(pa.len() >= gc * MR * GROUP && pb.len() >= gc * NR * GROUP);
        // SAFETY: the function's contract, for each T = height and side.
        unsafe {
            match (height, weights_left) {
                (6, true) => rows::<6, true>(pa, pb, gc, acc),
                (6, false) => rows::<6, false>(pa, pb, gc, acc),
                (5, true) => rows::<5, true>(pa, pb, gc, acc),
                (5, false) => rows::<5, false>(pa, pb, gc, acc),
                (4, true) => rows::<4, true>(pa, pb, gc, acc),
                (4, false) => rows::<4, false>(pa, pb, gc, acc),
                (3, true) => rows::<3, true>(pa, pb, gc, acc),
                (3, false) => rows::<3, false>(pa, pb, gc, acc),
                (2, true) => rows::<2, true>(pa, pb, gc, acc),
                (2, false) => rows::<2, false>(pa, pb, gc, acc),
                (_, true) => rows::<1, true>(pa, pb, gc, acc),
                (_, false) => rows::<1, false>(pa, pb, gc, acc),
            }
        }
    }

    /// [`super::quantize_line`] and [`super::quantize_lanes`]: eight values at a time,
    /// rounded to the nearest (even) integer by `vcvtps2dq`, the zero point added, clamped to
    /// `0..=255` by the saturating packs; the rest in plain code.
    ///
    /// # Safety
    /// The CPU has AVX2; per-value coefficients hold at least `values.len()` entries.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(
        values: &[f32],
        (coefficients, out): (super::Coefficients<'_>, &mut [u8]),
    ) {
        use super::Coefficients::{All, Each};
        let len = values.len().min(out.len());
        let whole = len / 8 * 8;
        // SAFETY: i + 8 <= whole <= every slice's length read or written.
        unsafe {
            for i in (0..whole).step_by(8) {
                let v = _mm256_loadu_ps(values.as_ptr().add(i));
                let (inverse, zero) = match coefficients {
                    All(inverse, zero) => (_mm256_set1_ps(inverse), _mm256_set1_epi32(zero)),
                    Each(inverses, zeros) => (
                        _mm256_loadu_ps(inverses.as_ptr().add(i)),
                        _mm256_loadu_si256(zeros.as_ptr().add(i).cast()),
                    ),
                };
                let q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, inverse)), zero);
                // Per 128-bit half: [q0..q3] as 16 bits, then as bytes, in its low 4 bytes.
                let words = _mm256_packs_epi32(q, q);
                let bytes = _mm256_packus_epi16(words, words);
                let low = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
                let high = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(bytes));
                let at = out.as_mut_ptr().add(i).cast::<i32>();
                at.write_unaligned(low);
                at.add(1).write_unaligned(high);
            }
        }
        for i in whole..len {
            let (inverse, zero) = match coefficients {
                All(inverse, zero) => (inverse, zero),
                Each(inverses, zeros) => (inverses[i], zeros[i]),
            };
            out[i] = super::quantize_activation(values[i], inverse, zero);
        }
    }

    /// `dst` row `r` (`+=` with `add`) `= sa_r sb_j (acc_rj - oa_r ob_j)` for the tile's rows
    /// (`sa`, `oa`: one per row) and its [`NR`] columns.
    ///
    /// # Safety
    /// The CPU has AVX2; `dst.0 + r * dst.1` holds `NR` values for every row `r`; the
    /// differences fit `i32` (a block's sums and corrections do: module doc).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn finish(
        acc: &[[i32; NR]; MR],
        (sa, oa): (&[f32], &[i32]),
        (sb, ob): (&[f32], &[i32]),
        (dst, stride): (*mut f32, usize),
        add: bool,
    ) {
        // SAFETY: sb and ob hold NR values; dst's rows NR (contract).
        unsafe {
            let sb = [
                _mm256_loadu_ps(sb.as_ptr()),
                _mm256_loadu_ps(sb.as_ptr().add(8)),
            ];
            let ob = [
                _mm256_loadu_si256(ob.as_ptr().cast()),
                _mm256_loadu_si256(ob.as_ptr().add(8).cast()),
            ];
            for (r, (row, (&sa, &oa))) in acc.iter().zip(sa.iter().zip(oa)).enumerate() {
                let (sa, oa) = (_mm256_set1_ps(sa), _mm256_set1_epi32(oa));
                for half in 0..2 {
                    let sum = _mm256_loadu_si256(row.as_ptr().add(8 * half).cast());
                    let exact = _mm256_sub_epi32(sum, _mm256_mullo_epi32(oa, ob[half]));
                    let scale = _mm256_mul_ps(sa, sb[half]);
                    let mut value = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), scale);
                    let at = dst.add(r * stride + 8 * half);
                    if add {
                        value = _mm256_add_ps(value, _mm256_loadu_ps(at));
                    }
                    _mm256_storeu_ps(at, value);
                }
            }
        }
    }

    /// [`sums`] for `T` rows; `LEFT_SIGNED`: `a` holds the signed weights.
    ///
    /// # Safety
    /// As [`sums`]'s.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn rows<const T: usize, const LEFT_SIGNED: bool>(
        pa: &[u8],
        pb: &[u8],
        gc: usize,
        out: &mut [[i32; NR]; MR],
    ) {
        // SAFETY: pa holds gc * MR * 4 bytes and pb gc * NR * 4 (contract).
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_si256(); 2]; T];
            let (a, b) = (pa.as_ptr(), pb.as_ptr());
            for g in 0..gc {
                let bt = b.add(g * NR * GROUP);
                let b0 = _mm256_loadu_si256(bt.cast());
                let b1 = _mm256_loadu_si256(bt.add(32).cast());
                let at = a.add(g * MR * GROUP);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(at.add(r * GROUP).cast::<i32>().read_unaligned());
                    let (p0, p1) = if LEFT_SIGNED {
                        (_mm256_maddubs_epi16(b0, x), _mm256_maddubs_epi16(b1, x))
                    } else {
                        (_mm256_maddubs_epi16(x, b0), _mm256_maddubs_epi16(x, b1))
                    };
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p0, ones));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(p1, ones));
                }
            }
            for (row, acc) in out.iter_mut().zip(&acc) {
                _mm256_storeu_si256(row.as_mut_ptr().cast(), acc[0]);
                _mm256_storeu_si256(row.as_mut_ptr().add(8).cast(), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{check_output, values, view};

    /// `c` (`m x n`, row-major) as a product's output.
    fn output(c: &mut [f32], m: usize, n: usize) -> MatrixMut<'_> {
        MatrixMut {
            data: c,
            rows: m,
            columns: n,
            row_stride: n,
            column_stride: 1,
        }
    }

    fn at(x: &Matrix<'_>, i: usize, j: usize) -> f32 {
        x.data[i * x.row_stride + j * x.column_stride]
    }

    /// `x` (read as `side`'s operand) as the product sees it: each lane quantized by the
    /// module's rule and turned back into values, as `[lane][step]`; and each lane's scale.
    fn dequantized_activations(x: &Matrix<'_>, side: Side) -> (Vec<Vec<f64>>, Vec<f64>) {
        let (lanes, depth, ls, ts) = lanes_of(x, side);
        let mut out = Vec::new();
        let mut scales = Vec::new();
        for l in 0..lanes {
            let lane: Vec<f32> = (0..depth).map(|t| x.data[l * ls + t * ts]).collect();
            let min = lane.iter().copied().fold(0f32, f32::min);
            let max = lane.iter().copied().fold(0f32, f32::max);
            let (scale, zero) = activation_scale(min, max);
            out.push(
                lane.iter()
                    .map(|&v| {
                        let q = quantize_activation(v, 1.0 / scale, zero);
                        f64::from(scale) * f64::from(i32::from(q) - zero)
                    })
                    .collect(),
            );
            scales.push(f64::from(scale));
        }
        (out, scales)
    }

    /// `c` by the definition in f64 from the operands the product sees: `w`'s 7-bit values
    /// times their scales and `x` quantized per lane.
    fn definition(x: &Matrix<'_>, w: &Quantized) -> Vec<f64> {
        let (m, k) = (w.dims().0, w.dims().1);
        match w.side() {
            Side::Left => {
                let n = x.columns;
                let (xs, _) = dequantized_activations(x, Side::Right);
                let mut c = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        c[i * n + j] = (0..k).map(|t| f64::from(w.value(i, t)) * xs[j][t]).sum();
                    }
                }
                c
            }
            Side::Right => {
                let (k, n) = w.dims();
                let m = x.rows;
                let (xs, _) = dequantized_activations(x, Side::Left);
                let mut c = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        c[i * n + j] = (0..k).map(|t| xs[i][t] * f64::from(w.value(j, t))).sum();
                    }
                }
                c
            }
        }
    }

    #[test]
    fn quantized_products_are_the_definition_on_the_quantized_operands() {
        // Sizes that end part-way through a tile, a panel, a group of four steps and a block
        // of steps (k > 1024); rows past one block of rows (m > MC); both sides of the
        // weights, transposed views, one and two threads, accumulating or not.
        let shapes = [
            (7, 37, 23),
            (37, 1030, 19),
            (150, 70, 40),
            (1, 5, 1),
            (13, 2100, 33),
        ];
        for (m, k, n) in shapes {
            let a_data = values(m * k, 1);
            let b_data = values(k * n, 2);
            for (a_t, b_t, c_t) in [(false, false, false), (true, true, true)] {
                let a = view(&a_data, m, k, a_t);
                let b = view(&b_data, k, n, b_t);
                for weights in [Side::Left, Side::Right] {
                    let (x, w) = match weights {
                        Side::Left => (b, Quantized::new(a, Side::Left).unwrap()),
                        Side::Right => (a, Quantized::new(b, Side::Right).unwrap()),
                    };
                    assert_eq!(
                        w.dims(),
                        if weights == Side::Left {
                            (m, k)
                        } else {
                            (k, n)
                        }
                    );
                    let expected = definition(&x, &w);
                    for (threads, accumulate) in [(1, false), (2, true)] {
                        let label = format!("{m}x{k}x{n} {a_t} {c_t} {weights:?} {threads}");
                        let run = |c: MatrixMut<'_>| {
                            matmul_quantized(x, &w, c, accumulate, threads).unwrap()
                        };
                        check_output(&expected, (m, n), (c_t, accumulate), 1e-4, &label, run);
                    }
                }
            }
        }
    }

    #[test]
    fn activations_read_through_any_strides_are_the_same_product() {
        // Every other value of a wider matrix: neither the steps nor the lanes contiguous.
        let (m, k, n) = (9, 70, 20);
        let wide = values(2 * m * k, 3);
        let x = Matrix {
            data: &wide,
            rows: m,
            columns: k,
            row_stride: 2 * k,
            column_stride: 2,
        };
        let w_data = values(k * n, 4);
        let w = Quantized::new(view(&w_data, k, n, false), Side::Right).unwrap();
        let expected = definition(&x, &w);
        for threads in [1, 2] {
            let run = |c: MatrixMut<'_>| matmul_quantized(x, &w, c, false, threads).unwrap();
            check_output(&expected, (m, n), (false, false), 1e-4, "strided", run);
        }
    }

    #[test]
    fn quantized_products_are_within_the_rounding_bound_of_the_f32_product() {
        // Each weight is off by at most half its lane's step, each activation by half its
        // lane's: |error| <= sum |a| dw / 2 + |w| da / 2 + da dw / 4, element by element.
        let (m, k, n) = (20, 300, 24);
        let a_data: Vec<f32> = values(m * k, 5).iter().map(|v| v * 3.0 + 0.2).collect();
        let w_data = values(k * n, 6);
        let a = view(&a_data, m, k, false);
        let w_view = view(&w_data, k, n, false);
        let w = Quantized::new(w_view, Side::Right).unwrap();
        let (_, sa) = dequantized_activations(&a, Side::Left);
        let sw: Vec<f64> = (0..n).map(|j| f64::from(w.scales[j])).collect();
        let mut c = vec![0f32; m * n];
        let out = output(&mut c, m, n);
        matmul_quantized(a, &w, out, false, 2).unwrap();
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut bound) = (0f64, 0f64);
                for t in 0..k {
                    let (x, y) = (f64::from(at(&a, i, t)), f64::from(at(&w_view, t, j)));
                    exact += x * y;
                    bound += x.abs() * sw[j] / 2.0 + y.abs() * sa[i] / 2.0 + sa[i] * sw[j] / 4.0;
                }
                let error = (f64::from(c[i * n + j]) - exact).abs();
                assert!(
                    error <= bound + 1e-5,
                    "({i}, {j}): error {error} over {bound}"
                );
                worst = worst.max(error / bound);
            }
        }
        // Rounding errors mostly cancel: far inside the worst case, yet not zero.
        assert!(worst > 0.0 && worst < 0.5, "{worst}");
    }

    #[test]
    fn the_extreme_codes_do_not_saturate() {
        // Activations all at the top of their range (code 255) against weights all +64 or
        // all -64: every pair of products is +-32640, the most a 16-bit lane of vpmaddubsw
        // holds; the sums are exact.
        let (m, k, n) = (6, 1032, 16);
        let ones = vec![1f32; m * k];
        let x = view(&ones, m, k, false);
        let w_data: Vec<f32> = (0..k * n)
            .map(|i| if i % n < 8 { 1.0 } else { -1.0 })
            .collect();
        let w = Quantized::new(view(&w_data, k, n, false), Side::Right).unwrap();
        let mut c = vec![0f32; m * n];
        let out = output(&mut c, m, n);
        matmul_quantized(x, &w, out, false, 1).unwrap();
        for (i, v) in c.iter().enumerate() {
            let want = if i % n < 8 { k as f32 } else { -(k as f32) };
            assert!((v - want).abs() < 1e-2, "{i}: {v} vs {want}");
        }
        // The plain sums against the vector ones on random codes, the extremes included.
        #[cfg(target_arch = "x86_64")]
        if crate::tile::available() {
            let gc = 40;
            // Unsigned codes 0..=255 and signed ones -64..=64, both ends included.
            let unsigned =
                |len: usize| (0..len).map(|i| (i * 7919 % 256) as u8).collect::<Vec<_>>();
            let signed = |len: usize| {
                (0..len)
                    .map(|i| ((i * 104_729 % 129) as i32 - 64) as i8 as u8)
                    .collect::<Vec<_>>()
            };
            let (a_len, b_len) = (gc * MR * GROUP, gc * NR * GROUP);
            for weights_left in [false, true] {
                // The weights' signed codes on their side.
                let (pa, pb) = match weights_left {
                    false => (unsigned(a_len), signed(b_len)),
                    true => (signed(a_len), unsigned(b_len)),
                };
                for height in 1..=MR {
                    let (mut plain, mut vector) = ([[0i32; NR]; MR], [[0i32; NR]; MR]);
                    sums(height, (&pa, &pb, gc), weights_left, &mut plain);
                    // SAFETY: the CPU has AVX2; the panels hold gc groups.
                    unsafe { avx2::sums(height, (&pa, &pb, gc), weights_left, &mut vector) };
                    assert_eq!(plain[..height], vector[..height], "{height} {weights_left}");
                }
            }
        }
    }

    #[test]
    fn int8_weights_are_requantized_to_seven_bits() {
        // Row-major [2, 3] as a left operand: lanes are rows.
        let q = [127i8, -64, 1, -128, 1, -3];
        let w = Quantized::from_int8(&q, &[0.5, 2.0], (2, 3), Side::Left).unwrap();
        assert_eq!(w.dims(), (2, 3));
        // Lane 0: max 127, scale 0.5 * 127 / 64; codes 64, -32, round(0.504) = 1.
        let s = 0.5 * 127.0 / 64.0;
        let got: Vec<f32> = (0..3).map(|t| w.value(0, t)).collect();
        assert_eq!(got, vec![64.0 * s, -32.0 * s, s]);
        // Lane 1: max 128, scale 2 * 128 / 64 = 4; halves away from zero: 0.5 -> 1, -1.5 -> -2.
        assert_eq!(
            (0..3).map(|t| w.value(1, t)).collect::<Vec<_>>(),
            vec![-256.0, 4.0, -8.0]
        );
        // As a right operand, lanes are columns: [2, 3] has three. Column 0 is [127, -128]:
        // 63.5 -> 64 at scale 2; column 1 [-64, 1]: -64 at scale 1.
        let w = Quantized::from_int8(&q, &[1.0, 1.0, 1.0], (2, 3), Side::Right).unwrap();
        assert_eq!(
            (w.dims(), w.value(0, 0), w.value(0, 1), w.value(1, 0)),
            ((2, 3), 128.0, -128.0, -64.0)
        );
        // A lane of zeros stays zero.
        let zeros = Quantized::from_int8(&[0, 0], &[1.0], (1, 2), Side::Left).unwrap();
        assert_eq!((zeros.value(0, 0), zeros.value(0, 1)), (0.0, 0.0));
        assert!(Quantized::from_int8(&q, &[1.0], (2, 3), Side::Left).is_err());
        assert!(Quantized::from_int8(&q, &[1.0; 2], (2, 2), Side::Left).is_err());
    }

    #[test]
    fn a_lane_that_is_not_finite_gives_nan_and_sizes_that_do_not_fit_are_refused() {
        let (m, k, n) = (3, 8, 5);
        let mut a_data = values(m * k, 1);
        a_data[k + 2] = f32::NAN;
        let w_data = values(k * n, 2);
        let w = Quantized::new(view(&w_data, k, n, false), Side::Right).unwrap();
        let mut c = vec![0f32; m * n];
        let out = output(&mut c, m, n);
        matmul_quantized(view(&a_data, m, k, false), &w, out, false, 1).unwrap();
        let nan: Vec<bool> = c.iter().map(|v| v.is_nan()).collect();
        let want: Vec<bool> = (0..m * n).map(|i| i / n == 1).collect();
        assert_eq!(nan, want);
        let out = output(&mut c, m, n);
        let short = view(&a_data[..m * (k - 1)], m, k - 1, false);
        assert_eq!(
            matmul_quantized(short, &w, out, false, 1),
            Err(MatmulMismatch("the operands' sizes do not fit"))
        );
    }
}
