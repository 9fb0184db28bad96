//! Scaled dot-product attention, on the CPU without the score matrix in memory.
//!
//! candle's composition, `softmax(q kᵀ) v`, materialises the scores of every row and head at
//! once: at 64x64 latents that is 4096 x 4096 f32 per head, 1 GiB for one guided job of SD v1.5
//! (8 heads, 2 rows) in every self-attention layer, written by one product, read and written by
//! the softmax (whose `expf` is a libm call per element) and read again by the next product, all
//! in fresh pages. On the CPU in f32 this module instead walks blocks of [`QUERY_BLOCK`] queries
//! of one head on each thread: the block's scores are computed into a buffer the thread reuses,
//! replaced by their exponentials in place ([`crate::vmath::exponentials`], vector code), and
//! multiplied by v; each output row is then divided by its row's sum (e values instead of the m
//! of the score row). The arithmetic is the composition's (the same products, the same
//! softmax); only summation order, the place of the division and the exponential's last bit
//! differ (tests: within 2e-6 of candle's).
//!
//! Elsewhere (GPUs, f16 and bf16) it is the composition, with the softmax of
//! [`crate::fused::softmax_last_dim`].
//!
//! The products are the `gemm` crate's (candle's own CPU matrix-product kernels) through
//! [`product`], the module's one `unsafe` call, behind a check that every index it can touch is
//! inside its slice.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::fused::softmax_last_dim;
use crate::vmath::exponentials;

/// Queries per block: their scores against 4096 keys are 2 MiB per thread. Measured on a 2-core
/// AMD EPYC (512 KiB L2 per core, 8 MiB L3), one SD v1.5 self-attention at 64x64 (16 x 4096 x
/// 40): 32 queries 0.92 s, 64 0.88, 128 0.85, 256 0.86, 512 0.91 (candle's composition: 2.0 s).
const QUERY_BLOCK: usize = 128;

/// `softmax(q kᵀ) v` per leading index: `q` `[b, n, d]` (already scaled), `k` `[b, m, d]`, `v`
/// `[b, m, e]`; `[b, n, e]` out.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
        let (b, _, d) = q.dims3()?;
        let (bk, m, dk) = k.dims3()?;
        let (bv, mv, _) = v.dims3()?;
        if (bk, dk) != (b, d) || (bv, mv) != (b, m) {
            candle_core::bail!(
                "attention shapes disagree: q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        // Empty matrices (no keys, zero widths) are left to the composition.
        if m > 0 && d > 0 && v.dim(2)? > 0 {
            return q.contiguous()?.apply_op3_no_bwd(
                &k.contiguous()?,
                &v.contiguous()?,
                &CpuAttention,
            );
        }
    }
    softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v)
}

struct CpuAttention;

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "diffusionx-cpu-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (values(sq, lq)?, values(sk, lk)?, values(sv, lv)?);
        let (b, n, d) = lq.shape().dims3()?;
        let (_, m, e) = lv.shape().dims3()?;
        let qb = QUERY_BLOCK;
        let mut out = vec![0f32; b * n * e];
        // Tasks are (row-head, block of queries), dealt out in order to the threads.
        let blocks = n.div_ceil(qb);
        let tasks = b * blocks;
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(tasks.max(1));
        let per_thread = tasks.div_ceil(threads).max(1);
        // Each thread's tasks are one contiguous run of the output: (head, block) in order.
        let mut runs = Vec::with_capacity(threads);
        let mut rest = out.as_mut_slice();
        for t in 0..threads {
            let first = t * per_thread;
            let last = ((t + 1) * per_thread).min(tasks);
            if first >= last {
                break;
            }
            let rows: usize = (first..last)
                .map(|task| qb.min(n - (task % blocks) * qb))
                .sum();
            let (run, tail) = rest.split_at_mut(rows * e);
            runs.push((first..last, run));
            rest = tail;
        }
        std::thread::scope(|scope| {
            for (range, run) in runs {
                scope.spawn(move || {
                    let mut scores = vec![0f32; qb * m];
                    let mut sums = vec![0f32; qb];
                    let mut at = 0;
                    for task in range {
                        let (head, block) = (task / blocks, task % blocks);
                        let first = block * qb;
                        let rows = qb.min(n - first);
                        let q = &q[(head * n + first) * d..(head * n + first + rows) * d];
                        let k = &k[head * m * d..(head + 1) * m * d];
                        let v = &v[head * m * e..(head + 1) * m * e];
                        let scores = &mut scores[..rows * m];
                        // scores = q kᵀ: k read as its transpose (rows of k are columns).
                        product((rows, m, d), scores, View::new(q, d, 1), View::new(k, 1, d));
                        for (row, sum) in scores.chunks_exact_mut(m).zip(&mut sums) {
                            *sum = exponentials(row);
                        }
                        let out = &mut run[at..at + rows * e];
                        product(
                            (rows, e, m),
                            out,
                            View::new(scores, m, 1),
                            View::new(v, e, 1),
                        );
                        for (row, sum) in out.chunks_exact_mut(e).zip(&sums) {
                            let inv = 1.0 / sum;
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                        at += rows * e;
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, e))))
    }
}

/// The values of a contiguous f32 tensor.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("attention takes contiguous tensors"),
    }
}

/// A matrix as a slice with a row stride and a column stride.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride,
        }
    }

    /// Whether every element of a `rows` x `cols` matrix lies inside the slice.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst` (`m` x `n`, rows contiguous) = `lhs` (`m` x `k`) times `rhs` (`k` x `n`), on the
/// calling thread.
///
/// # Panics
/// If a matrix does not fit its slice (a bug in the caller; never reached from outside).
fn product((m, n, k): (usize, usize, usize), dst: &mut [f32], lhs: View<'_>, rhs: View<'_>) {
    assert!(
        dst.len() == m * n && lhs.holds(m, k) && rhs.holds(k, n),
        "attention product out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: the assertion above keeps every index the product reads (lhs, rhs) or writes
    // (dst, rows of n contiguous values) inside its slice; `dst` is borrowed mutably, so it
    // aliases neither input; `read_dst` is false, so dst's old values are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            stride(n),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        // candle's CPU generator cannot be seeded: values from our own, as the refiner's noise.
        let mut values = vec![0f32; shape.iter().product::<usize>()];
        diffusionx_diffusion::gaussian_noise(seed, 0, &mut values);
        Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
    }

    fn composition(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let scores = q.matmul(&k.t().expect("t")).expect("scores");
        candle_nn::ops::softmax_last_dim(&scores)
            .expect("softmax")
            .matmul(v)
            .expect("product")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff")
    }

    /// The blocked attention equals candle's composition: self-attention with a query count
    /// that is not a multiple of the block (a partial last block, on every thread's boundary),
    /// cross-attention over 77 tokens with a value width unlike the key width, and scores
    /// large enough that an unshifted exponential would overflow.
    #[test]
    fn blocked_attention_is_the_composition() {
        for (b, n, m, d, e, scale) in [
            (3, 150, 150, 8, 8, 0.35),
            (2, 64, 77, 16, 24, 0.25),
            (1, 1, 5, 4, 4, 1.0),
            (4, 200, 33, 8, 8, 12.0),
        ] {
            let q = (random(&[b, n, d], 1) * scale).expect("scale");
            let k = random(&[b, m, d], 2);
            let v = random(&[b, m, e], 3);
            let ours = attention(&q, &k, &v).expect("attention");
            assert_eq!(ours.dims(), &[b, n, e]);
            let expected = composition(&q, &k, &v);
            let diff = max_diff(&ours, &expected);
            assert!(diff < 2e-6, "{b}x{n}x{m}x{d}x{e}: {diff}");
            // Each output row is a convex mix of v's rows: it moves when a key of its own head
            // changes, and not when one of another head does.
            if b > 1 {
                let k2 = k
                    .slice_assign(
                        &[1..2, 0..m, 0..d],
                        &(k.i(1..2).expect("i") * 3.0).expect("k"),
                    )
                    .expect("assign");
                let moved = (attention(&q, &k2, &v).expect("attention") - &ours)
                    .and_then(|t| t.abs()?.max(2)?.max(1))
                    .expect("moved");
                let moved: Vec<f32> = moved.to_vec1().expect("vec");
                assert_eq!(moved[0], 0.0);
                assert!(moved[1] > 1e-3, "{moved:?}");
            }
        }
    }

    /// Off the CPU's f32 path (here: f16 on the CPU) it is the composition with the f32 softmax.
    #[test]
    fn other_dtypes_take_the_composition() {
        let q = random(&[2, 10, 8], 4).to_dtype(DType::F16).expect("f16");
        let k = random(&[2, 12, 8], 5).to_dtype(DType::F16).expect("f16");
        let v = random(&[2, 12, 8], 6).to_dtype(DType::F16).expect("f16");
        let ours = attention(&q, &k, &v).expect("attention");
        assert_eq!(ours.dtype(), DType::F16);
        let expected = softmax_last_dim(&q.matmul(&k.t().expect("t")).expect("s"))
            .and_then(|p| p.matmul(&v))
            .expect("composition");
        assert_eq!(
            max_diff(
                &ours.to_dtype(DType::F32).expect("f32"),
                &expected.to_dtype(DType::F32).expect("f32")
            ),
            0.0
        );
    }

    /// Degenerate shapes (no queries, no keys, zero widths) give the composition's answer,
    /// never a panic.
    #[test]
    fn empty_shapes_do_not_panic() {
        for (n, m, d, e) in [(0, 5, 4, 4), (3, 5, 0, 4), (3, 5, 4, 0)] {
            let q = Tensor::zeros((2, n, d), DType::F32, &Device::Cpu).expect("q");
            let k = Tensor::zeros((2, m, d), DType::F32, &Device::Cpu).expect("k");
            let v = Tensor::ones((2, m, e), DType::F32, &Device::Cpu).expect("v");
            let ours = attention(&q, &k, &v).expect("attention");
            assert_eq!(ours.dims(), &[2, n, e]);
            // Zero scores: every query takes the mean of v's rows, all ones.
            let values: Vec<f32> = ours.flatten_all().expect("flat").to_vec1().expect("vec");
            assert!(values.iter().all(|&x| x == 1.0), "{values:?}");
        }
    }

    /// Mismatched shapes are an error, not a panic.
    #[test]
    fn mismatched_shapes_are_an_error() {
        let q = random(&[2, 10, 8], 7);
        let k = random(&[2, 12, 8], 8);
        let v = random(&[2, 11, 8], 9);
        let err = attention(&q, &k, &v).expect_err("mismatch");
        assert!(
            err.to_string().contains("attention shapes disagree"),
            "{err}"
        );
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
