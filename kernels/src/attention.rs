//! Scaled dot-product attention for one block of queries of one head, without the score matrix.
//!
//! The composition `softmax(q kᵀ) v` materialises the scores of every query of every head at
//! once: at 64x64 latents that is 4096 x 4096 f32 per head, written by one product, read and
//! written by the softmax, read again by the next product, all in fresh pages. [`attend`]
//! instead takes a block of [`query_block`] queries, computed one of two ways:
//!
//! - on x86-64 CPUs with AVX2 and FMA (`fma.rs`): the scores held transposed, 16 queries to a
//!   pair of vectors, keys taken 256 at a time with a running max per query (flash attention's
//!   online softmax), both products by one 6 x 16 register tile on keys and values packed per
//!   chunk, the exponentials in base 2 (one FMA per score for `(s - max) log2 e`). Nothing but
//!   the keys and values leaves L1, and a chunk of them is read by all the block's queries
//!   while it is in L2;
//! - elsewhere (the `gemm` crate's products, candle's own CPU kernels): the block's scores in a
//!   buffer the caller reuses ([`Scratch`]), replaced by their exponentials in place
//!   ([`crate::vmath::exponentials`], vector code) and multiplied by v; each output row is then
//!   divided by its row's sum (e values instead of the m of the score row).
//!
//! The arithmetic is the composition's (the same products, the same softmax); only summation
//! order, the place of the division and the exponential's last bits differ. `product` here is
//! one `unsafe` call into `gemm`, behind a check that every index it can touch is inside its
//! slice.
#![allow(unsafe_code)]

use crate::vmath::exponentials;

#[cfg(target_arch = "x86_64")]
mod fma;

/// Queries per block on the gemm path: their scores against 4096 keys are 2 MiB per thread.
/// Measured on a 2-core AMD EPYC (512 KiB L2 per core, 8 MiB L3), one SD v1.5 self-attention at
/// 64x64 (16 x 4096 x 40): 32 queries 0.92 s, 64 0.88, 128 0.85, 256 0.86, 512 0.91 (candle's
/// composition: 2.0 s).
const GEMM_QUERY_BLOCK: usize = 128;

/// Queries per block on the FMA path, whose block holds no scores (16 KiB of them per group of
/// 16 queries at a time), only each query's accumulators: the larger the block, the more
/// queries read each chunk of keys and values packed and in L2. Measured on a 2-core AMD EPYC
/// (Zen 3), one thread, 8 heads of 4096 x 4096 x 40: 128 queries 0.56 s, 256 0.45-0.47, 512
/// 0.39-0.42, 1024 0.34-0.41.
#[cfg(target_arch = "x86_64")]
const FMA_QUERY_BLOCK: usize = 512;

/// Queries per call of [`attend`] that make the most of its path on this CPU: callers split a
/// head's queries into blocks of this many (fewer when there are too few blocks to keep every
/// thread busy).
pub fn query_block() -> usize {
    match Path::best() {
        Path::Gemm => GEMM_QUERY_BLOCK,
        #[cfg(target_arch = "x86_64")]
        Path::Fma => FMA_QUERY_BLOCK,
    }
}

/// A matrix inside a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// The matrix whose element `(i, j)` is `data[i * row_stride + j * col_stride]`.
    pub fn new(data: &'a [f32], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride,
        }
    }

    /// The same elements read as the transpose.
    fn transposed(self) -> Self {
        Self::new(self.data, self.col_stride, self.row_stride)
    }

    /// Whether every element of a `rows` x `cols` matrix lies inside the slice.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        holds(
            self.data.len(),
            self.row_stride,
            self.col_stride,
            rows,
            cols,
        )
    }
}

/// A matrix written inside a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug)]
pub struct ViewMut<'a> {
    data: &'a mut [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> ViewMut<'a> {
    /// The matrix whose element `(i, j)` is `data[i * row_stride + j * col_stride]`.
    pub fn new(data: &'a mut [f32], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride,
        }
    }

    fn holds(&self, rows: usize, cols: usize) -> bool {
        holds(
            self.data.len(),
            self.row_stride,
            self.col_stride,
            rows,
            cols,
        )
    }

    fn reborrow(&mut self) -> ViewMut<'_> {
        ViewMut::new(self.data, self.row_stride, self.col_stride)
    }
}

fn holds(len: usize, row_stride: usize, col_stride: usize, rows: usize, cols: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(row_stride)
            .zip((cols - 1).checked_mul(col_stride))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < len)
}

/// A matrix of [`attend`] does not fit its slice, or there are no keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBounds {
    /// `(queries, keys, key width, value width)` as asked.
    pub dims: (usize, usize, usize, usize),
}

impl std::fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, m, d, e) = self.dims;
        write!(
            f,
            "attention of {n} queries over {m} keys (widths {d} and {e}): a matrix does not \
             fit its slice, or there are no keys"
        )
    }
}

impl std::error::Error for OutOfBounds {}

/// The buffers one thread reuses from block to block: a block's scores and its row sums (and,
/// on AVX2 and FMA, the queries transposed, a chunk of keys and values packed, and the output
/// accumulators).
#[derive(Debug, Default)]
pub struct Scratch {
    scores: Vec<f32>,
    sums: Vec<f32>,
    queries: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    acc: Vec<f32>,
}

/// Which code computes [`attend`]: the `gemm` crate's products around the vector exponentials
/// (any CPU), or the register tiles of the AVX2/FMA module (x86-64 CPUs that have both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Gemm,
    #[cfg(target_arch = "x86_64")]
    Fma,
}

impl Path {
    /// The fastest this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if fma::available() {
            return Path::Fma;
        }
        Path::Gemm
    }
}

/// `out = softmax(q kᵀ) v` for `rows` queries of one head, on the calling thread: `q` is
/// `rows` x `d` (already scaled), `k` is `m` x `d` (a key per row), `v` is `m` x `e`, `out` is
/// `rows` x `e`. `dims` is `(rows, m, d, e)`; `m` is at least 1.
pub fn attend(
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    dims: (usize, usize, usize, usize),
    out: ViewMut<'_>,
    scratch: &mut Scratch,
) -> Result<(), OutOfBounds> {
    attend_on(Path::best(), q, k, v, dims, out, scratch)
}

fn attend_on(
    path: Path,
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    dims: (usize, usize, usize, usize),
    mut out: ViewMut<'_>,
    scratch: &mut Scratch,
) -> Result<(), OutOfBounds> {
    let (rows, m, d, e) = dims;
    if m == 0 || !(q.holds(rows, d) && k.holds(m, d) && v.holds(m, e) && out.holds(rows, e)) {
        return Err(OutOfBounds { dims });
    }
    #[cfg(target_arch = "x86_64")]
    if path == Path::Fma && d > 0 && e > 0 {
        fma::attend(q, k, v, dims, out, scratch);
        return Ok(());
    }
    let _ = path;
    scratch.scores.resize(rows * m, 0.0);
    scratch.sums.resize(rows, 0.0);
    let scores = &mut scratch.scores[..rows * m];
    // scores = q kᵀ: k read as its transpose (rows of k are columns).
    product((rows, m, d), ViewMut::new(scores, m, 1), q, k.transposed())?;
    for (row, sum) in scores.chunks_exact_mut(m).zip(&mut scratch.sums) {
        *sum = exponentials(row);
    }
    product((rows, e, m), out.reborrow(), View::new(scores, m, 1), v)?;
    for (i, sum) in scratch.sums[..rows].iter().enumerate() {
        let inv = 1.0 / sum;
        let row = &mut out.data[i * out.row_stride..];
        if out.col_stride == 1 {
            // Contiguous rows (both engines' layouts): a loop the compiler vectorises.
            row[..e].iter_mut().for_each(|x| *x *= inv);
        } else {
            (0..e).for_each(|j| row[j * out.col_stride] *= inv);
        }
    }
    Ok(())
}

/// `dst` (`m` x `n`) = `lhs` (`m` x `k`) times `rhs` (`k` x `n`), on the calling thread.
fn product(
    (m, n, k): (usize, usize, usize),
    dst: ViewMut<'_>,
    lhs: View<'_>,
    rhs: View<'_>,
) -> Result<(), OutOfBounds> {
    if !(dst.holds(m, n) && lhs.holds(m, k) && rhs.holds(k, n)) {
        return Err(OutOfBounds { dims: (m, k, k, n) });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst.data[i * dst.row_stride + j * dst.col_stride] = 0.0;
            }
        }
        return Ok(());
    }
    // Strides of at most a slice's length (checked above) fit an isize.
    let stride = |s: usize| s as isize;
    // SAFETY: the check above keeps every index the product reads (lhs, rhs) or writes (dst)
    // inside its slice; `dst` is borrowed mutably, so it aliases neither input; `read_dst` is
    // false, so dst's old values are never read; `Parallelism::None` runs it on this thread.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            stride(dst.col_stride),
            stride(dst.row_stride),
            false,
            lhs.data.as_ptr(),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut values = vec![0f32; len];
        diffusionx_diffusion::gaussian_noise(seed, 0, &mut values);
        values.iter_mut().for_each(|x| *x *= scale);
        values
    }

    /// The composition in f64: scores, a max-shifted softmax per row, the product with v.
    fn reference(
        q: &dyn Fn(usize, usize) -> f32,
        k: &dyn Fn(usize, usize) -> f32,
        v: &dyn Fn(usize, usize) -> f32,
        (n, m, d, e): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * e];
        for i in 0..n {
            let scores: Vec<f64> = (0..m)
                .map(|j| (0..d).map(|c| q(i, c) as f64 * k(j, c) as f64).sum())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = p.iter().sum();
            for c in 0..e {
                out[i * e + c] = (0..m).map(|j| p[j] * v(j, c) as f64).sum::<f64>() / sum;
            }
        }
        out
    }

    /// Every path this CPU runs: the gemm one everywhere, the FMA tiles where the CPU has them
    /// (the x86-64 machines the tests run on).
    fn paths() -> Vec<Path> {
        let mut paths = vec![Path::Gemm];
        if Path::best() != Path::Gemm {
            paths.push(Path::best());
        }
        paths
    }

    /// Contiguous matrices: self-attention, cross-attention over 77 keys with a value width
    /// unlike the key width, one query, scores large enough that an unshifted exponential
    /// would overflow, and the kiosk's head widths (40 and 160) with groups, key tiles, key
    /// chunks and value tiles that end part-way (37 queries, 300 keys); on every path, within
    /// 2e-6 of the f64 composition, plus 1e-7 per unit of the largest score (f32 scores carry a
    /// rounding error relative to their size, which the exponential turns into the same
    /// relative error of the weights).
    #[test]
    fn a_block_is_the_composition() {
        for (path, (n, m, d, e, scale)) in paths().into_iter().flat_map(|path| {
            [
                (150, 150, 8, 8, 0.35),
                (64, 77, 16, 24, 0.25),
                (1, 5, 4, 4, 1.0),
                (100, 33, 8, 8, 12.0),
                (37, 300, 40, 40, 0.16),
                (20, 77, 160, 160, 0.08),
            ]
            .map(|case| (path, case))
        }) {
            let q = random(n * d, 1, scale);
            let k = random(m * d, 2, 1.0);
            let v = random(m * e, 3, 1.0);
            let mut out = vec![f32::NAN; n * e];
            let mut scratch = Scratch::default();
            attend_on(
                path,
                View::new(&q, d, 1),
                View::new(&k, d, 1),
                View::new(&v, e, 1),
                (n, m, d, e),
                ViewMut::new(&mut out, e, 1),
                &mut scratch,
            )
            .expect("in bounds");
            let expected = reference(
                &|i, c| q[i * d + c],
                &|j, c| k[j * d + c],
                &|j, c| v[j * e + c],
                (n, m, d, e),
            );
            let largest = (0..n * m)
                .map(|x| {
                    let (i, j) = (x / m, x % m);
                    (0..d)
                        .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                        .sum::<f64>()
                        .abs()
                })
                .fold(0f64, f64::max);
            let worst = out
                .iter()
                .zip(&expected)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            let bound = 2e-6 + 1e-7 * largest;
            assert!(
                worst < bound,
                "{path:?} {n}x{m}x{d}x{e}: {worst} (bound {bound})"
            );
        }
    }

    /// Strided views, as the kiosk's graphs lay heads out (`[tokens, heads, width]`): head 1 of
    /// 3 read and written in place, the other heads' output untouched, the keys stored
    /// transposed (a column stride other than 1); a second call on a reused scratch with fewer
    /// queries gives the same rows; on every path.
    #[test]
    fn strided_heads_are_read_and_written_in_place() {
        let (heads, n, m, d, e) = (3, 20, 9, 4, 6);
        let q = random(n * heads * d, 4, 0.5);
        let k = random(m * heads * d, 5, 1.0);
        let v = random(m * heads * e, 6, 1.0);
        let head = 1;
        // Head 1's keys as a d x m matrix: key j is column j.
        let kt: Vec<f32> = (0..d * m)
            .map(|x| k[((x % m) * heads + head) * d + x / m])
            .collect();
        let expected = reference(
            &|i, c| q[(i * heads + head) * d + c],
            &|j, c| k[(j * heads + head) * d + c],
            &|j, c| v[(j * heads + head) * e + c],
            (n, m, d, e),
        );
        for path in paths() {
            for keys in [
                View::new(&k[head * d..], heads * d, 1),
                View::new(&kt, 1, m),
            ] {
                let mut out = vec![7.0f32; n * heads * e];
                let mut scratch = Scratch::default();
                let mut call = |rows: usize, out: ViewMut<'_>| {
                    attend_on(
                        path,
                        View::new(&q[head * d..], heads * d, 1),
                        keys,
                        View::new(&v[head * e..], heads * e, 1),
                        (rows, m, d, e),
                        out,
                        &mut scratch,
                    )
                    .expect("in bounds")
                };
                call(n, ViewMut::new(&mut out[head * e..], heads * e, 1));
                for i in 0..n {
                    for h in 0..heads {
                        for c in 0..e {
                            let got = out[(i * heads + h) * e + c];
                            if h == head {
                                let want = expected[i * e + c];
                                assert!(
                                    (got as f64 - want).abs() < 2e-6,
                                    "{path:?} ({i}, {c}): {got} {want}"
                                );
                            } else {
                                assert_eq!(got, 7.0, "{path:?}: head {h} was written");
                            }
                        }
                    }
                }
                // Fewer queries on the same scratch: the first rows again.
                let mut first = vec![0f32; 3 * e];
                call(3, ViewMut::new(&mut first, e, 1));
                for i in 0..3 {
                    for c in 0..e {
                        assert_eq!(first[i * e + c], out[(i * heads + head) * e + c]);
                    }
                }
            }
        }
    }

    /// A NaN in one query (a NaN latent upstream) makes that query's output row NaN and leaves
    /// every other row as it is without it, on every path.
    #[test]
    fn a_nan_query_stays_in_its_row() {
        let (n, m, d, e) = (20, 30, 8, 8);
        let mut q = random(n * d, 7, 0.3);
        let k = random(m * d, 8, 1.0);
        let v = random(m * e, 9, 1.0);
        for path in paths() {
            let run = |q: &[f32]| {
                let mut out = vec![0f32; n * e];
                attend_on(
                    path,
                    View::new(q, d, 1),
                    View::new(&k, d, 1),
                    View::new(&v, e, 1),
                    (n, m, d, e),
                    ViewMut::new(&mut out, e, 1),
                    &mut Scratch::default(),
                )
                .expect("in bounds");
                out
            };
            let clean = run(&q);
            q[17 * d + 3] = f32::NAN;
            let dirty = run(&q);
            q[17 * d + 3] = 0.1;
            for i in 0..n {
                let (a, b) = (&clean[i * e..][..e], &dirty[i * e..][..e]);
                if i == 17 {
                    assert!(b.iter().all(|x| x.is_nan()), "{path:?}: {b:?}");
                } else {
                    assert_eq!(a, b, "{path:?}: row {i}");
                }
            }
        }
    }

    /// A matrix that does not fit its slice, and no keys, are errors, never a panic or a read
    /// out of bounds.
    #[test]
    fn out_of_bounds_and_empty_keys_are_errors() {
        let q = vec![0f32; 8];
        let k = vec![0f32; 8];
        let v = vec![0f32; 7];
        let mut out = vec![0f32; 8];
        let mut scratch = Scratch::default();
        let mut call = |v: &[f32], keys: usize| {
            attend(
                View::new(&q, 4, 1),
                View::new(&k, 4, 1),
                View::new(v, 4, 1),
                (2, keys, 4, 4),
                ViewMut::new(&mut out, 4, 1),
                &mut scratch,
            )
        };
        let err = call(&v, 2).expect_err("v is one short");
        assert_eq!(err.dims, (2, 2, 4, 4));
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = call(&k, 0).expect_err("no keys");
        assert_eq!(err.dims, (2, 0, 4, 4));
        // A stride whose product overflows is out of bounds, not a wrapped index.
        assert!(!View::new(&q, usize::MAX, 1).holds(2, 1));
    }

    fn softmax_in_place(row: &mut [f32]) {
        let sum = exponentials(row);
        row.iter_mut().for_each(|x| *x /= sum);
    }

    /// A row whose scores are far apart: the largest takes all the weight, the others
    /// underflow to (almost) nothing instead of overflowing.
    #[test]
    fn softmax_of_a_wide_row() {
        let mut row = vec![0.0, 1.0, 2.0, -3.0, 1000.0];
        softmax_in_place(&mut row);
        assert_eq!(row[4], 1.0);
        assert!(row[..4].iter().all(|&p| p < 1e-37), "{row:?}");
        // Lengths past the vector lanes, with a remainder: uniform rows stay uniform.
        let mut row = vec![5.0; 19];
        softmax_in_place(&mut row);
        assert!(
            row.iter().all(|&p| (p - 1.0 / 19.0).abs() < 1e-7),
            "{row:?}"
        );
        let mut row = vec![0.0, 2f32.ln(), 3f32.ln()];
        softmax_in_place(&mut row);
        for (p, expected) in row.iter().zip([1.0 / 6.0, 1.0 / 3.0, 0.5]) {
            assert!((p - expected).abs() < 1e-7, "{row:?}");
        }
    }
}
