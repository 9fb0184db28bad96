//! Scaled dot-product attention, on the CPU without the score matrix in memory.
//!
//! candle's composition, `softmax(q kᵀ) v`, materialises the scores of every row and head at
//! once: at 64x64 latents that is 4096 x 4096 f32 per head, 1 GiB for one guided job of SD v1.5
//! (8 heads, 2 rows) in every self-attention layer, written by one product, read and written by
//! the softmax (whose `expf` is a libm call per element) and read again by the next product, all
//! in fresh pages. On the CPU in f32 this module instead deals blocks of
//! [`query_block`] queries of one head out to the threads, each computed by the kernel the kiosk
//! shares, [`diffusionx_kernels::attend`] (on AVX2 and FMA register tiles over chunks of keys
//! with an online softmax, elsewhere scores in a buffer the thread reuses; exponentials in
//! vector code, the division moved to the output rows; within 2e-6 of candle's composition).
//!
//! Elsewhere (GPUs, f16 and bf16) it is the composition, with the softmax of
//! [`crate::fused::softmax_last_dim`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use diffusionx_kernels::{Scratch, View, ViewMut, attend, query_block};

use crate::fused::softmax_last_dim;

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
        let qb = query_block();
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
            let handles: Vec<_> = runs
                .into_iter()
                .map(|(range, run)| {
                    scope.spawn(move || {
                        let mut scratch = Scratch::default();
                        let mut at = 0;
                        for task in range {
                            let (head, block) = (task / blocks, task % blocks);
                            let first = block * qb;
                            let rows = qb.min(n - first);
                            attend(
                                View::new(&q[(head * n + first) * d..], d, 1),
                                View::new(&k[head * m * d..], d, 1),
                                View::new(&v[head * m * e..], e, 1),
                                (rows, m, d, e),
                                ViewMut::new(&mut run[at..at + rows * e], e, 1),
                                &mut scratch,
                            )?;
                            at += rows * e;
                        }
                        Ok::<_, diffusionx_kernels::OutOfBounds>(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| candle_core::Error::Msg("an attention thread panicked".into()))?
                    .map_err(candle_core::Error::wrap)
            })
        })?;
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
}
