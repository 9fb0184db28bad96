//! `c = a b` with one operand packed once, ahead of time: a layer's weights packed at load into
//! the panels the register tile reads, so that no call packs them again.
//!
//! The product is the blocked one of BLIS (Goto's algorithm) around the 6 x 16 register tile
//! (`crate::tile`, on x86-64 CPUs with AVX2 and FMA; elsewhere the same tile in plain code): for
//! each block of [`KC`] steps of the inner size, panels of [`MR`] rows of `a` (the broadcast
//! operand) against panels of [`NR`] columns of `b` (the vector operand). A [`Packed`] operand
//! holds every block's panels in the order the product reads them; the other operand, a plain
//! [`Matrix`] view, is packed per call as BLIS does (`b` in blocks of columns that the threads
//! pack together and share, `a` a block of rows per task).
//!
//! Why: a UNet's weights come from memory once per call, and the `gemm` crate packs its
//! broadcast operand per call; measured on the kiosk's shapes (`docs/benchmarks.md`, section
//! "Weights packed at load"), packing them per call cost as much as the product for the layers
//! with few tokens.
//!
//! `unsafe` here: reads and writes through raw pointers inside the extents [`matmul_packed`]
//! checked (views that fit their slices, `c`'s elements distinct), shared between the threads,
//! each writing its own elements of `c`, and the calls into `#[target_feature]` code after the
//! run-time check.
#![allow(unsafe_code)]

use std::cell::Cell;

use rayon::prelude::*;

use crate::matmul::{MatmulMismatch, Matrix, MatrixMut, check};

/// Rows of a tile: the broadcast operand's.
pub const MR: usize = 6;
/// Columns of a tile: two 8-wide vectors.
pub const NR: usize = 16;
/// Steps of the inner size per block: a panel of `b` is `KC` x 16 f32, 16 KiB, in L1 while
/// every tile of a block of rows uses it.
pub const KC: usize = 256;
/// Rows of `a` per block: a packed block is `MC` x `KC` f32, 144 KiB, in L2.
pub(crate) const MC: usize = 144;
/// Columns of a plain `b` per block: a packed block of `b` is `KC` x `NC` f32, 4 MiB, in L3,
/// which the threads pack together and share.
const NC: usize = 4096;

#[cfg(target_arch = "x86_64")]
const _: () = assert!(MR == crate::tile::MR && NR == crate::tile::NR);

/// Which operand of a product a [`Packed`] matrix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `a` (`rows x depth`), in panels of [`MR`] rows.
    Left,
    /// `b` (`depth x columns`), in panels of [`NR`] columns.
    Right,
}

impl Side {
    /// `(rows, columns)` of a matrix of `lanes` (rows on the left, columns on the right) over
    /// `depth` steps of the inner size.
    pub(crate) fn dims(self, lanes: usize, depth: usize) -> (usize, usize) {
        match self {
            Side::Left => (lanes, depth),
            Side::Right => (depth, lanes),
        }
    }

    /// Lanes per panel.
    fn width(self) -> usize {
        match self {
            Side::Left => MR,
            Side::Right => NR,
        }
    }
}

/// A matrix packed for one side of [`matmul_packed`]: for each block of [`KC`] steps of the
/// inner size (from step `pc` on, `kc` steps), its panels of [`Side`]'s width one after another
/// from `pc * lanes` (lanes rounded up to whole panels), panel `p`'s element (lane `l`, step
/// `t`) at `+ p * width * kc + t * width + l`, lanes past the matrix zero.
#[derive(Clone, PartialEq)]
pub struct Packed {
    data: Vec<f32>,
    side: Side,
    /// Rows of `a` or columns of `b`.
    lanes: usize,
    depth: usize,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("side", &self.side)
            .field("lanes", &self.lanes)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

impl Packed {
    /// `x` packed as the left operand (`a`, its rows the lanes) or the right one (`b`, its
    /// columns the lanes).
    pub fn new(x: Matrix<'_>, side: Side) -> Result<Packed, MatmulMismatch> {
        check(&x)?;
        // The lanes and steps as rows and columns of one view.
        let (lanes, depth, view) = match side {
            Side::Left => (x.rows, x.columns, raw(&x)),
            Side::Right => (x.columns, x.rows, raw(&x).transposed()),
        };
        let width = side.width();
        let padded = lanes.next_multiple_of(width);
        let mut data = vec![0f32; padded * depth];
        if lanes > 0 {
            for pc in (0..depth).step_by(KC) {
                let kc = KC.min(depth - pc);
                let block = &mut data[pc * padded..pc * padded + padded * kc];
                // SAFETY: `check` keeps every element of x inside its slice; the block holds
                // the lanes' panels over kc steps.
                unsafe {
                    match side {
                        Side::Left => pack::<MR>(view.at(0, pc), (lanes, kc), block),
                        Side::Right => pack::<NR>(view.at(0, pc), (lanes, kc), block),
                    }
                }
            }
        }
        Ok(Packed {
            data,
            side,
            lanes,
            depth,
        })
    }

    /// The side it was packed for.
    pub fn side(&self) -> Side {
        self.side
    }

    /// `(rows, columns)` of the matrix it holds.
    pub fn dims(&self) -> (usize, usize) {
        self.side.dims(self.lanes, self.depth)
    }

    /// A matrix of `lanes` x `depth` (rows x columns for [`Side::Left`], columns x rows for
    /// [`Side::Right`]) packed as it is written: `fill(t, lanes)` writes step `t`'s lanes (a
    /// column of `a`, a row of `b`), which go straight into their panels, on `threads` threads
    /// of rayon's pool (blocks of [`KC`] steps each). `data` is a buffer the caller reuses from
    /// call to call ([`Packed::into_data`]); nothing is written twice, so a convolution's
    /// columns pass through memory once.
    pub fn from_steps(
        side: Side,
        (lanes, depth): (usize, usize),
        mut data: Vec<f32>,
        threads: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Packed {
        let width = side.width();
        let padded = lanes.next_multiple_of(width);
        let len = padded * depth;
        if data.len() < len {
            data.resize(len, 0.0);
        }
        data.truncate(len);
        let block = |(q, block): (usize, &mut [f32])| {
            let pc = q * KC;
            let kc = KC.min(depth - pc);
            // Lanes past the matrix stay zero in every step.
            let mut row = vec![0f32; padded];
            for t in 0..kc {
                fill(pc + t, &mut row[..lanes]);
                for (p, values) in row.chunks_exact(width).enumerate() {
                    block[(p * kc + t) * width..][..width].copy_from_slice(values);
                }
            }
        };
        if padded > 0 {
            if threads > 1 && depth > KC {
                data.par_chunks_mut(KC * padded).enumerate().for_each(block);
            } else {
                data.chunks_mut(KC * padded).enumerate().for_each(block);
            }
        }
        Packed {
            data,
            side,
            lanes,
            depth,
        }
    }

    /// Its buffer, for the next [`Packed::from_steps`].
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Block `pc`'s panels for lanes `first..first + count` (`first` a multiple of the panel
    /// width).
    pub(crate) fn block(&self, pc: usize, first: usize, count: usize) -> &[f32] {
        let (width, kc) = (self.side.width(), KC.min(self.depth - pc));
        let padded = self.lanes.next_multiple_of(width);
        let start = pc * padded + first * kc;
        &self.data[start..start + count.next_multiple_of(width) * kc]
    }
}

/// One operand of [`matmul_packed`].
#[derive(Debug, Clone, Copy)]
pub enum Operand<'a> {
    /// A plain view, packed per call.
    View(Matrix<'a>),
    /// Packed ahead of time, for its side.
    Packed(&'a Packed),
}

/// Whether the register tile runs as AVX2/FMA code on this CPU (elsewhere [`matmul_packed`]
/// runs the same tile in plain code: correct, not fast).
pub fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::tile::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c = a b`, or `c += a b` with `accumulate`, on `threads` threads of rayon's pool (1: this
/// thread only), either operand packed ([`Packed`], for its side) or a plain view. `c`'s
/// elements must be distinct; the product is fastest with `c`'s columns contiguous.
pub fn matmul_packed(
    a: Operand<'_>,
    b: Operand<'_>,
    c: MatrixMut<'_>,
    accumulate: bool,
    threads: usize,
) -> Result<(), MatmulMismatch> {
    let dims = |x: Operand<'_>, side: Side| match x {
        Operand::View(view) => check(&view).map(|()| (view.rows, view.columns)),
        Operand::Packed(p) if p.side == side => Ok(p.dims()),
        Operand::Packed(_) => Err(MatmulMismatch("a packed operand on the other side")),
    };
    let ((m, k), (kb, n)) = (dims(a, Side::Left)?, dims(b, Side::Right)?);
    if kb != k || c.rows != m || c.columns != n {
        return Err(MatmulMismatch("the operands' sizes do not fit"));
    }
    let Some(c) = crate::matmul::output_to_write(c, k, accumulate)? else {
        return Ok(());
    };
    let c = Raw {
        ptr: c.data.as_mut_ptr(),
        rs: c.row_stride,
        cs: c.column_stride,
    };
    fn source<'a>(x: Operand<'a>) -> Source<'a> {
        match x {
            Operand::View(view) => Source::Plain(raw(&view)),
            Operand::Packed(p) => Source::Packed(p),
        }
    }
    // SAFETY: the views fit their slices and c's elements are distinct (checked above); c is
    // borrowed mutably for the call, so it aliases neither input; m, n, k > 0.
    unsafe { product((m, n, k), source(a), source(b), c, accumulate, threads) };
    Ok(())
}

/// One operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Raw {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

fn raw(x: &Matrix<'_>) -> Raw {
    Raw {
        ptr: x.data.as_ptr().cast_mut(),
        rs: x.row_stride,
        cs: x.column_stride,
    }
}

impl Raw {
    /// The same elements read as the transpose.
    fn transposed(self) -> Raw {
        Raw {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The view from element `(i, j)` on (a pointer inside the extent for the callers' `(i, j)`).
    fn at(self, i: usize, j: usize) -> Raw {
        Raw {
            ptr: self.ptr.wrapping_add(i * self.rs + j * self.cs),
            ..self
        }
    }
}

// SAFETY: the threads read `a` and `b` and write disjoint elements of `c` (see `product`).
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

/// An operand as [`product`] reads it.
#[derive(Clone, Copy)]
enum Source<'a> {
    Plain(Raw),
    Packed(&'a Packed),
}

thread_local! {
    /// Each thread's buffer for a packed block of `a`.
    static PACKED_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's buffer for a packed block of `b`, which the threads share.
    static PACKED_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `c (m x n) = a (m x k) b (k x n)`, or `c +=` with `accumulate`.
///
/// For each block of [`NC`] columns and [`KC`] steps, a plain `b`'s block is packed by the
/// threads together into one buffer they then share. Each thread takes a share
/// of the larger operand's lanes (`b`'s columns when it has more of them than `a` has rows, or
/// when `a` has fewer than two tiles of rows per thread; else `a`'s rows) and, per block of
/// steps, walks its share's rows [`MC`] at a time (a plain `a`'s block packed as it goes).
///
/// # Safety
/// Every element `(i, l)` of a plain `a`, `(l, j)` of a plain `b` and `(i, j)` of `c` (`i < m`,
/// `l < k`, `j < n`) is inside an allocation its pointer may read (`c`: write); `c`'s elements
/// are distinct and alias neither input; packed operands have these sizes; `m`, `n`, `k` > 0.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    a: Source<'_>,
    b: Source<'_>,
    c: Raw,
    accumulate: bool,
    threads: usize,
) {
    let threads = threads.max(1);
    // The threads split the operand that is larger: each thread reads all of the other one
    // (a weight read whole by every thread costs its trip from memory once per thread).
    let by_columns = threads > 1 && (n > m || m.div_ceil(MR) < 2 * threads) && n > NR;
    let split = |t: usize, len: usize, unit: usize| {
        let units = len.div_ceil(unit);
        (units * t / threads * unit).min(len)..(units * (t + 1) / threads * unit).min(len)
    };
    // Columns per block of a plain b, packed KC steps at a time (KC x NC f32 at most).
    let ncb = match b {
        Source::Plain(_) => NC,
        Source::Packed(_) => n,
    };
    let mut pb = PACKED_B.take();
    if let Source::Plain(_) = b {
        pb.resize(ncb.min(n).next_multiple_of(NR) * KC.min(k), 0.0);
    }
    for jc in (0..n).step_by(ncb) {
        let nc = ncb.min(n - jc);
        let panels = nc.div_ceil(NR);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            if let Source::Plain(b) = b {
                // This block of b, its panels shared out between the threads to pack.
                let block = &mut pb[..panels * NR * kc];
                let bb = b.at(pc, jc).transposed();
                let per_thread = panels.div_ceil(threads);
                let pack_panels = |(q, part): (usize, &mut [f32])| {
                    let first = q * per_thread * NR;
                    let lanes = (nc - first).min(per_thread * NR);
                    // SAFETY: rows pc..pc + kc and columns jc + first.. of b, `lanes` of
                    // them: inside its extent; the part holds their panels.
                    unsafe { pack::<NR>(bb.at(first, 0), (lanes, kc), part) };
                };
                let chunk = per_thread * NR * kc;
                if threads > 1 && panels > 1 {
                    block
                        .par_chunks_mut(chunk)
                        .enumerate()
                        .for_each(pack_panels);
                } else {
                    block.chunks_mut(chunk).enumerate().for_each(pack_panels);
                }
            }
            let pb = &pb;
            let task = |t: usize| {
                let (rows, columns) = match (threads, by_columns) {
                    (1, _) => (0..m, 0..nc),
                    (_, true) => (0..m, split(t, nc, NR)),
                    (_, false) => (split(t, m, MR), 0..nc),
                };
                if rows.is_empty() || columns.is_empty() {
                    return;
                }
                let width = columns.len();
                let panel_b = match b {
                    Source::Plain(_) => {
                        let first = columns.start * kc;
                        &pb[first..first + width.next_multiple_of(NR) * kc]
                    }
                    Source::Packed(b) => b.block(pc, jc + columns.start, width),
                };
                let mut pa = PACKED_A.take();
                if let Source::Plain(_) = a {
                    pa.resize(MC * KC, 0.0);
                }
                for ic in rows.clone().step_by(MC) {
                    let count = MC.min(rows.end - ic);
                    let panel_a = match a {
                        Source::Plain(a) => {
                            // SAFETY: rows ic..ic + count of a, steps pc..pc + kc: inside its
                            // extent; the buffer holds them.
                            unsafe { pack::<MR>(a.at(ic, pc), (count, kc), &mut pa) };
                            &pa[..count.next_multiple_of(MR) * kc]
                        }
                        Source::Packed(a) => a.block(pc, ic, count),
                    };
                    // SAFETY: the packed blocks hold what the tiles read; the task's rows and
                    // columns of c are inside its extent and no other task's.
                    unsafe {
                        tiles(
                            panel_a,
                            panel_b,
                            (count, width, kc),
                            c.at(ic, jc + columns.start),
                            accumulate || pc > 0,
                        )
                    };
                }
                PACKED_A.set(pa);
            };
            if threads > 1 {
                (0..threads).into_par_iter().for_each(task);
            } else {
                task(0);
            }
        }
    }
    PACKED_B.set(pb);
}

/// The first `count` rows of `x` over `depth` columns (steps), packed in panels of `W` rows:
/// panel `p`'s element `(lane, t)` at `(p * depth + t) * W + lane`, lanes past `count` zero.
/// (`b`'s panels are its columns: callers pass `b` transposed.)
///
/// # Safety
/// Every element taken is inside `x`'s extent; `packed` holds the panels.
unsafe fn pack<const W: usize>(x: Raw, (count, depth): (usize, usize), packed: &mut [f32]) {
    let panels = count.div_ceil(W);
    let packed = &mut packed[..panels * W * depth];
    if x.rs == 1 {
        // Each step's lanes are contiguous: a step at a time across every panel, in the order
        // the memory runs (a `b` of thousands of columns has one step per page: down one
        // panel's steps alone, every read would be a miss no prefetcher follows).
        for t in 0..depth {
            // SAFETY: step t's `count` lanes are inside x's extent (function contract).
            let src = unsafe { std::slice::from_raw_parts(x.ptr.add(t * x.cs), count) };
            for (p, lanes) in src.chunks(W).enumerate() {
                let dst = &mut packed[(p * depth + t) * W..][..W];
                dst[..lanes.len()].copy_from_slice(lanes);
                dst[lanes.len()..].fill(0.0);
            }
        }
        return;
    }
    for (p, panel) in packed.chunks_exact_mut(W * depth).enumerate() {
        let lanes = W.min(count - p * W);
        let base = x.ptr.wrapping_add(p * W * x.rs);
        if lanes < W {
            panel.fill(0.0);
        }
        if x.cs <= x.rs {
            // Along each lane's run of steps (contiguous for a row-major a).
            for lane in 0..lanes {
                let src = base.wrapping_add(lane * x.rs);
                for (t, slot) in panel.iter_mut().skip(lane).step_by(W).enumerate() {
                    // SAFETY: lane < count and t < depth: inside x's extent.
                    *slot = unsafe { *src.add(t * x.cs) };
                }
            }
        } else {
            for (t, lanes_t) in panel.chunks_exact_mut(W).enumerate() {
                let src = base.wrapping_add(t * x.cs);
                for (lane, slot) in lanes_t.iter_mut().enumerate().take(lanes) {
                    // SAFETY: as above.
                    *slot = unsafe { *src.add(lane * x.rs) };
                }
            }
        }
    }
}

/// Every tile of the packed blocks `pa` (`mc` rows) and `pb` (`nc` columns) over `kc` steps,
/// written into (`add`: added to) `c` from its element `(0, 0)`.
///
/// # Safety
/// `c`'s elements `(i, j)`, `i < mc`, `j < nc`, are inside its extent and the caller's to
/// write; the packed blocks hold the panels.
unsafe fn tiles(pa: &[f32], pb: &[f32], (mc, nc, kc): (usize, usize, usize), c: Raw, add: bool) {
    let mut buffer = [0f32; MR * NR];
    let fast = fast();
    for (jr, panel_b) in pb.chunks_exact(NR * kc).take(nc.div_ceil(NR)).enumerate() {
        let columns = NR.min(nc - jr * NR);
        for (ir, panel_a) in pa.chunks_exact(MR * kc).take(mc.div_ceil(MR)).enumerate() {
            let rows = MR.min(mc - ir * MR);
            let at = c.at(ir * MR, jr * NR);
            let direct = columns == NR && c.cs == 1;
            let (dst, stride, add_here) = match direct {
                true => (at.ptr, c.rs, add),
                false => (buffer.as_mut_ptr(), NR, false),
            };
            // SAFETY: the panels hold kc steps (chunks of the packed blocks); the tile's rows
            // and columns of c (or the buffer) are inside its extent (function contract).
            unsafe { tile(fast, rows, (panel_a, panel_b, kc), (dst, stride), add_here) };
            if !direct {
                for r in 0..rows {
                    for j in 0..columns {
                        // SAFETY: (ir * MR + r, jr * NR + j) is inside c's extent.
                        let dst = unsafe { &mut *at.ptr.add(r * c.rs + j * c.cs) };
                        let value = buffer[r * NR + j];
                        *dst = if add { *dst + value } else { value };
                    }
                }
            }
        }
    }
}

/// One tile: on AVX2/FMA code where `fast`, else in plain code.
///
/// # Safety
/// As `crate::tile::tile`'s (`fast` only where the CPU has AVX2 and FMA).
#[inline]
unsafe fn tile(
    fast: bool,
    rows: usize,
    (a, b, depth): (&[f32], &[f32], usize),
    (dst, stride): (*mut f32, usize),
    add: bool,
) {
    debug_assert!(a.len() >= depth * MR && b.len() >= depth * NR);
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: the function's contract; the CPU has AVX2 and FMA.
        unsafe { crate::tile::tile(rows, a.as_ptr(), b.as_ptr(), depth, (dst, stride), add) };
        return;
    }
    let _ = fast;
    let mut acc = [[0f32; NR]; MR];
    for (at, bt) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(depth) {
        for (row, x) in acc.iter_mut().zip(at) {
            for (sum, y) in row.iter_mut().zip(bt) {
                *sum += x * y;
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (j, value) in row.iter().enumerate() {
            // SAFETY: dst's rows r < rows hold NR values (function contract).
            let slot = unsafe { &mut *dst.add(r * stride + j) };
            *slot = if add { *slot + value } else { *value };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{check_output, naive, values, view};

    #[test]
    fn packed_products_are_the_definitions() {
        // Sizes that end part-way through a tile, a panel and a step block (k > KC), rows for
        // one task and for blocks of rows, columns past one block of a plain b (n > NC).
        let shapes = [
            (7, 600, 37),
            (37, 300, 23),
            (300, 40, 150),
            (13, 600, NC + 50),
        ];
        for (m, k, n) in shapes {
            let a_data = values(m * k, 1);
            let b_data = values(k * n, 2);
            for (a_t, b_t, c_t) in [
                (false, false, false),
                (true, true, false),
                (false, true, true),
            ] {
                let a = view(&a_data, m, k, a_t);
                let b = view(&b_data, k, n, b_t);
                let expected = naive(&a, &b);
                let pa = Packed::new(a, Side::Left).unwrap();
                let pb = Packed::new(b, Side::Right).unwrap();
                assert_eq!((pa.dims(), pb.dims()), ((m, k), (k, n)));
                let operands = [
                    (Operand::Packed(&pa), Operand::View(b)),
                    (Operand::View(a), Operand::Packed(&pb)),
                    (Operand::Packed(&pa), Operand::Packed(&pb)),
                    (Operand::View(a), Operand::View(b)),
                ];
                for (x, y) in operands {
                    for (threads, accumulate) in [(1, false), (2, true)] {
                        let label = format!("{m}x{k}x{n} {a_t} {b_t} {c_t} {threads}");
                        let run =
                            |c: MatrixMut<'_>| matmul_packed(x, y, c, accumulate, threads).unwrap();
                        check_output(&expected, (m, n), (c_t, accumulate), 1e-4, &label, run);
                    }
                }
            }
        }
    }

    #[test]
    fn matrices_packed_as_they_are_written_are_the_same_packing() {
        // Steps past one block, lanes past one panel; a buffer reused from a larger matrix.
        let mut buffer = vec![f32::NAN; 10_000];
        for (side, lanes, depth) in [
            (Side::Right, 37, 300),
            (Side::Left, 13, 260),
            (Side::Right, 5, 3),
        ] {
            let data = values(lanes * depth, 3);
            // Step t's lanes at data[t * lanes..]: b row-major, or a column-major.
            let view = match side {
                Side::Right => view(&data, depth, lanes, false),
                Side::Left => view(&data, lanes, depth, true),
            };
            let want = Packed::new(view, side).unwrap();
            let fill = |t: usize, row: &mut [f32]| row.copy_from_slice(&data[t * lanes..][..lanes]);
            for threads in [1, 2] {
                let got = Packed::from_steps(side, (lanes, depth), buffer, threads, fill);
                assert_eq!(got, want, "{side:?} {lanes} x {depth}, {threads} threads");
                buffer = got.into_data();
            }
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let data = values(12, 0);
        let mut out = vec![0f32; 12];
        let a = view(&data, 3, 4, false);
        let b = view(&data, 4, 3, false);
        let pa = Packed::new(a, Side::Left).unwrap();
        fn c(out: &mut [f32]) -> MatrixMut<'_> {
            MatrixMut {
                data: out,
                rows: 3,
                columns: 3,
                row_stride: 3,
                column_stride: 1,
            }
        }
        assert_eq!(
            matmul_packed(
                Operand::View(a),
                Operand::Packed(&pa),
                c(&mut out),
                false,
                1
            ),
            Err(MatmulMismatch("a packed operand on the other side"))
        );
        assert_eq!(
            matmul_packed(
                Operand::Packed(&pa),
                Operand::View(a),
                c(&mut out),
                false,
                1
            ),
            Err(MatmulMismatch("the operands' sizes do not fit"))
        );
        let short = Matrix { rows: 4, ..a };
        assert_eq!(
            Packed::new(short, Side::Left),
            Err(MatmulMismatch("a view reaches past its slice"))
        );
        assert_eq!(
            matmul_packed(
                Operand::Packed(&pa),
                Operand::View(b),
                c(&mut out),
                false,
                1
            ),
            Ok(())
        );
        let expected = naive(&a, &b);
        for (got, want) in out.iter().zip(&expected) {
            assert!((f64::from(*got) - want).abs() < 1e-5);
        }
    }
}
