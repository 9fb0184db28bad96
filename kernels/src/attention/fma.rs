//! [`super::attend`] on x86-64 CPUs with AVX2 and FMA: scores held transposed (keys x
//! queries), so that one register tile serves both products and the softmax runs down the
//! vector lanes, and keys taken [`KEY_CHUNK`] at a time with a running max per query (the
//! online softmax of flash attention), so that nothing but the keys and values leaves L1.
//!
//! The block's queries form groups of [`LANES`] (two 8-wide vectors), packed transposed once
//! (`qᵀ`, `d` x 16 per group). For each chunk of keys, its keys and values are packed as the
//! tiles read them (`pack`: each tile's [`ROWS`] rows side by side, step after step), then for
//! each group:
//! 1. `sᵀ = k qᵀ` (`keys` x 16): tiles of [`ROWS`] keys x 16 queries, accumulated in 12
//!    registers over the key width;
//! 2. per query (lane), the new max `M` (the old one and the chunk's); the group's output
//!    accumulator and sums scaled by `e^(old - M)` (1 exactly while the max stays), the scores
//!    replaced by `e^(s - M)` and added to the sums; the exponentials as `2^x` (`exp2`), `x` =
//!    `s log2 e - M log2 e` in one FMA;
//! 3. `oᵀ += vᵀ p` (`e` x 16): tiles of [`ROWS`] value columns x 16 queries by the same
//!    register tile over the chunk's keys.
//!
//! A chunk's packed keys and values (80 KiB at SD's head width of 40) are read by every group
//! of the block while they are in L2 (hence blocks of 512 queries, [`super::query_block`]); a
//! group's scores for the chunk (16 KiB) stay in L1. At the end each query's row of the output
//! is its column of `oᵀ` divided by its sum. The tile is the classic 6 x 16 one of an AVX2
//! matrix product ([`crate::tile`]).
//! Padding lanes (a group of fewer than 16 queries) compute on zeros and are never written
//! out.
//!
//! `unsafe` here: the raw-pointer loads, stores and broadcasts, each inside a range asserted
//! just before (or checked by [`super::View::holds`]), and the call into the
//! `#[target_feature]` code after the run-time check ([`available`]).
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::f32::consts::LOG2_E;

use super::{Scratch, View, ViewMut};
use crate::tile;

/// Queries per group: the tile's width, two 8-wide vectors.
const LANES: usize = tile::NR;
/// Rows of a register tile: keys in `sᵀ = k qᵀ`, value columns in `oᵀ += vᵀ p`.
const ROWS: usize = tile::MR;
/// Keys per chunk: a chunk's scores for one group are 256 x 16 f32, 16 KiB.
const KEY_CHUNK: usize = 256;

/// Whether the CPU has what this module's code needs (AVX2 and FMA).
pub(super) fn available() -> bool {
    tile::available()
}

/// `out = softmax(q kᵀ) v` as [`super::attend`], whose checks it relies on: every view holds
/// its matrix (`dims` = `(rows, m, d, e)`, all four at least 1 but `rows`).
pub(super) fn attend(
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    dims: (usize, usize, usize, usize),
    out: ViewMut<'_>,
    scratch: &mut Scratch,
) {
    assert!(
        available(),
        "attention's FMA path on a CPU without AVX2 and FMA"
    );
    // SAFETY: the CPU has AVX2 and FMA (asserted above), the one requirement of `chunks`.
    unsafe { chunks(q, k, v, dims, out, scratch) }
}

#[target_feature(enable = "avx2,fma")]
fn chunks(
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    (rows, m, d, e): (usize, usize, usize, usize),
    out: ViewMut<'_>,
    scratch: &mut Scratch,
) {
    assert!(m > 0 && d > 0 && e > 0);
    let groups = rows.div_ceil(LANES);
    // Per group: qᵀ (d x 16), oᵀ (e x 16), the running max and sum (16 each).
    scratch.queries.clear();
    scratch.queries.resize(groups * d * LANES, 0.0);
    scratch.acc.clear();
    scratch.acc.resize(groups * e * LANES, 0.0);
    scratch.sums.clear();
    scratch.sums.resize(groups * 2 * LANES, 0.0);
    scratch.scores.resize(KEY_CHUNK * LANES, 0.0);
    for (i, qt) in scratch.queries.chunks_exact_mut(LANES).enumerate() {
        let (group, c) = (i / d, i % d);
        let first = group * LANES;
        for (l, x) in qt.iter_mut().enumerate().take(rows - first) {
            *x = q.data[(first + l) * q.row_stride + c * q.col_stride];
        }
    }
    for state in scratch.sums.chunks_exact_mut(2 * LANES) {
        state[..LANES].fill(f32::NEG_INFINITY);
    }
    let key_tiles = KEY_CHUNK.div_ceil(ROWS);
    scratch.keys.resize(key_tiles * ROWS * d, 0.0);
    scratch
        .values
        .resize(e.div_ceil(ROWS) * ROWS * KEY_CHUNK, 0.0);
    for j0 in (0..m).step_by(KEY_CHUNK) {
        let keys = KEY_CHUNK.min(m - j0);
        // The chunk's keys and values packed as the tiles read them: tile r's element (row,
        // step) at (r * depth + step) * ROWS + row, rows past the end zero.
        pack(k, (j0, keys), (0, d), &mut scratch.keys);
        pack(v.transposed(), (0, e), (j0, keys), &mut scratch.values);
        let st = &mut scratch.scores[..keys * LANES];
        for ((qt, acc), state) in scratch
            .queries
            .chunks_exact(d * LANES)
            .zip(scratch.acc.chunks_exact_mut(e * LANES))
            .zip(scratch.sums.chunks_exact_mut(2 * LANES))
        {
            // 1. sᵀ = k qᵀ for the chunk's keys, ROWS per tile.
            products(&scratch.keys, keys, (qt, d), st, false);
            // 2. The running max, the rescaled state, the chunk's exponentials.
            let (max, sums) = state.split_at_mut(LANES);
            online_softmax(st, max, sums, acc);
            // 3. oᵀ += vᵀ p: value columns as the tile's rows.
            products(&scratch.values, e, (st, keys), acc, true);
        }
    }
    // Each query's row: its column of oᵀ over its sum.
    for (row, out_row) in (0..rows).map(|r| (r, r * out.row_stride)) {
        let (group, l) = (row / LANES, row % LANES);
        let acc = &scratch.acc[group * e * LANES..];
        let inv = 1.0 / scratch.sums[group * 2 * LANES + LANES + l];
        for c in 0..e {
            out.data[out_row + c * out.col_stride] = acc[c * LANES + l] * inv;
        }
    }
}

/// The rows `[first, first + count)` of `x` (`count` x `depth`, of a matrix `depth` wide from
/// its column `depth.0`) packed in tiles of [`ROWS`] rows: tile `r`'s element `(row, step)` at
/// `(r * depth + step) * ROWS + row`, the last tile's rows past `count` zero. Read in the order
/// of memory (along rows when their elements are the closer, else down columns), so that
/// each cache line of `x` is fetched once and the prefetchers see one stride.
fn pack(x: View<'_>, (first, count): (usize, usize), depth: (usize, usize), packed: &mut [f32]) {
    let (from, depth) = depth;
    let tiles = count.div_ceil(ROWS);
    let packed = &mut packed[..tiles * ROWS * depth];
    let (rs, cs) = (x.row_stride, x.col_stride);
    let base = first * rs + from * cs;
    for (r, tile) in packed.chunks_exact_mut(ROWS * depth).enumerate() {
        let rows = ROWS.min(count - r * ROWS);
        if rows < ROWS {
            tile.fill(0.0);
        }
        let at = base + r * ROWS * rs;
        if cs <= rs {
            // Along each row: tile[step * ROWS + row] = x(row, step).
            for row in 0..rows {
                let src = &x.data[at + row * rs..];
                for (step, slot) in tile.iter_mut().skip(row).step_by(ROWS).enumerate() {
                    *slot = src[step * cs];
                }
            }
        } else {
            // Down each column: ROWS neighbours at a time.
            for (step, lanes) in tile.chunks_exact_mut(ROWS).enumerate() {
                let src = &x.data[at + step * cs..];
                for (row, slot) in lanes.iter_mut().enumerate().take(rows) {
                    *slot = src[row * rs];
                }
            }
        }
    }
}

/// `dst` (`count` x 16, rows contiguous) = (or `+=` if `add`) the packed tiles of `packed`
/// (`count` rows over `depth` steps, [`ROWS`] to a tile, as [`pack`] writes them) times `b`
/// (`depth` x 16, rows contiguous).
#[target_feature(enable = "avx2,fma")]
fn products(packed: &[f32], count: usize, (b, depth): (&[f32], usize), dst: &mut [f32], add: bool) {
    for (first, tile) in (0..count)
        .step_by(ROWS)
        .zip(packed.chunks_exact(ROWS * depth))
    {
        let rows = ROWS.min(count - first);
        let dst = &mut dst[first * LANES..(first + rows) * LANES];
        tile_product(rows, tile, b, depth, dst, add);
    }
}

/// `dst` (`rows` x 16, rows contiguous) = (or `+=` if `add`) the packed tile `a` ([`ROWS`] x
/// `depth`, element `(r, t)` at `a[t * ROWS + r]`) times `b` (`depth` x 16, rows contiguous).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn tile_product(rows: usize, a: &[f32], b: &[f32], depth: usize, dst: &mut [f32], add: bool) {
    assert!(
        (1..=ROWS).contains(&rows)
            && depth > 0
            && dst.len() == rows * LANES
            && b.len() >= depth * LANES
            && a.len() >= depth * ROWS,
        "a register tile's operand out of its slice"
    );
    // SAFETY: the bounds asserted above; the CPU has AVX2 and FMA (this function's features).
    unsafe {
        tile::tile(
            rows,
            a.as_ptr(),
            b.as_ptr(),
            depth,
            (dst.as_mut_ptr(), LANES),
            add,
        )
    }
}

/// One chunk of the online softmax for a group: `max` (16) becomes the max of itself and each
/// lane's scores in `st` (`keys` x 16); `sums` (16) and `acc` (`e` x 16) are scaled by
/// `e^(old max - new max)`; the scores become `e^(s - max)`, added to `sums`.
#[target_feature(enable = "avx2,fma")]
fn online_softmax(st: &mut [f32], max: &mut [f32], sums: &mut [f32], acc: &mut [f32]) {
    assert!(
        st.len().is_multiple_of(LANES)
            && acc.len().is_multiple_of(LANES)
            && max.len() == LANES
            && sums.len() == LANES
    );
    // SAFETY: every access below is at i * 16 (+ 8) for i < len / 16 of its slice.
    unsafe {
        let load = |s: &[f32], h: usize| _mm256_loadu_ps(s.as_ptr().add(8 * h));
        let old = [load(max, 0), load(max, 1)];
        let mut new = old;
        let p = st.as_mut_ptr();
        let rows = st.len() / LANES;
        for i in 0..rows {
            for (h, m) in new.iter_mut().enumerate() {
                // max(m, x): a NaN score stays out of the max (it reaches the output anyway).
                *m = _mm256_max_ps(_mm256_loadu_ps(p.add(i * LANES + 8 * h)), *m);
            }
        }
        // e^(s - max) as 2^(s log2 e - shift) in one FMA per score, `shift` = max log2 e rounded
        // once per lane: a rounding common to all the lane's weights, which the division by
        // their sum cancels, as long as the earlier chunks' weights are rescaled by
        // 2^(old shift - new shift), the same roundings.
        let log2e = _mm256_set1_ps(LOG2_E);
        let shift = [_mm256_mul_ps(new[0], log2e), _mm256_mul_ps(new[1], log2e)];
        let scale = [
            exp2(_mm256_sub_ps(_mm256_mul_ps(old[0], log2e), shift[0])),
            exp2(_mm256_sub_ps(_mm256_mul_ps(old[1], log2e), shift[1])),
        ];
        let mut total = [
            _mm256_mul_ps(load(sums, 0), scale[0]),
            _mm256_mul_ps(load(sums, 1), scale[1]),
        ];
        let a = acc.as_mut_ptr();
        for i in 0..acc.len() / LANES {
            for (h, s) in scale.iter().enumerate() {
                let at = a.add(i * LANES + 8 * h);
                _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), *s));
            }
        }
        for i in 0..rows {
            for (h, t) in total.iter_mut().enumerate() {
                let at = p.add(i * LANES + 8 * h);
                let x = exp2(_mm256_fmsub_ps(_mm256_loadu_ps(at), log2e, shift[h]));
                _mm256_storeu_ps(at, x);
                *t = _mm256_add_ps(*t, x);
            }
        }
        for h in 0..2 {
            _mm256_storeu_ps(max.as_mut_ptr().add(8 * h), new[h]);
            _mm256_storeu_ps(sums.as_mut_ptr().add(8 * h), total[h]);
        }
    }
}

/// `2^x` on eight lanes for `x` <= 0 (the arguments here): `x` rounded to an integer `n` (the
/// 1.5 * 2^23 trick), `2^(x - n)` by a degree-5 polynomial fitted on [-1/2, 1/2] (relative
/// error 3.5e-7 evaluated in f32, against 2.4e-7 for [`crate::vmath::exp`]), `2^n` built in
/// the exponent bits; clamped at -125 below (never a subnormal); a NaN stays a NaN; `2^0` is
/// exactly 1.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp2(x: __m256) -> __m256 {
    let set = _mm256_set1_ps;
    // max(floor, x) returns x when x is a NaN.
    let x = _mm256_max_ps(set(-125.0), x);
    let shifter = set(12_582_912.0);
    let n = _mm256_sub_ps(_mm256_add_ps(x, shifter), shifter);
    let f = _mm256_sub_ps(x, n);
    let mut p = set(1.291_567e-3);
    for c in [
        9.668_531e-3,
        5.551_689e-2,
        2.402_226_5e-1,
        6.931_464_7e-1,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, f, set(c));
    }
    let bits = _mm256_castps_si256(_mm256_add_ps(n, set(127.0 + 8_388_608.0)));
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
}
