//! The UNet's normalisations, bias adds and GEGLU, each one kernel on a GPU.
//!
//! On a CUDA device (with the `cuda` feature) these take the crate's own kernels
//! ([`crate::cuda`]). On the CPU in f32, GroupNorm (+SiLU) and GEGLU are one threaded pass each
//! ([`CpuGroupNorm`], [`CpuGeglu`]); everything else, and f16 on the CPU, is exactly candle's
//! composition.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn as nn;

/// `xs` `[n, c, h, w]` plus a per-channel `bias` `[c]` (candle's `Conv2d` bias add).
pub(crate) fn add_channel_bias(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = xs.dims4()?;
    #[cfg(feature = "cuda")]
    if let Some(ys) = crate::cuda::add_broadcast(xs, bias, h * w, c)? {
        return Ok(ys);
    }
    let _ = (h, w);
    xs.broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// `xs` `[.., c]` plus `bias` `[c]` (candle's `Linear` bias add).
pub(crate) fn add_last_bias(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ys) = crate::cuda::add_broadcast(xs, bias, 1, bias.elem_count())? {
        return Ok(ys);
    }
    xs.broadcast_add(bias)
}

/// `xs` `[n, c, h, w]` plus `t` `[n, c]` broadcast over the pixels (a resnet's time embedding).
pub(crate) fn add_per_channel(xs: &Tensor, t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let (n, c, h, w) = xs.dims4()?;
        if let Some(ys) = crate::cuda::add_broadcast(xs, t, h * w, n * c)? {
            return Ok(ys);
        }
    }
    t.unsqueeze(D::Minus1)?
        .unsqueeze(D::Minus1)?
        .broadcast_add(xs)
}

/// GEGLU of the projection `xs` `[.., 2 * inner]`: the first half times the exact GELU of the
/// second.
pub(crate) fn geglu(xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ys) = crate::cuda::geglu(xs)? {
        return Ok(ys);
    }
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.dim(D::Minus1)? % 2 == 0 {
        return xs.contiguous()?.apply_op1_no_bwd(&CpuGeglu);
    }
    let halves = xs.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// Softmax over the last dimension, accumulating in f32 on every device (the CPU's f16 kernel
/// would sum in f16, so there the input is widened first).
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ys) = crate::cuda::softmax_last_dim(xs)? {
        return Ok(ys);
    }
    if xs.device().is_cpu() && xs.dtype() != DType::F32 {
        nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())
    } else {
        nn::ops::softmax_last_dim(xs)
    }
}

/// diffusers' `GroupNorm` (candle's), optionally followed by SiLU in the same kernel.
pub(crate) struct GroupNorm {
    inner: nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vs: nn::VarBuilder<'_>,
    ) -> Result<Self> {
        let weight = vs.get_with_hints(channels, "weight", nn::Init::Const(1.))?;
        let bias = vs.get_with_hints(channels, "bias", nn::Init::Const(0.))?;
        Ok(Self {
            inner: nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The normalised `xs`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }

    /// SiLU of the normalised `xs`.
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && xs.rank() >= 3
            && xs.dim(1)? % self.groups == 0
        {
            let op = CpuGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return xs.contiguous()?.apply_op3_no_bwd(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                &op,
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(ys) =
            crate::cuda::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu)?
        {
            return Ok(ys);
        }
        let _ = (&self.weight, &self.bias, self.groups, self.eps);
        let ys = self.inner.forward(xs)?;
        if silu { nn::ops::silu(&ys) } else { Ok(ys) }
    }
}

/// GroupNorm (and SiLU) of contiguous f32 NCHW on the CPU in one pass per (row, group) over the
/// threads of the machine: candle's composition allocates and walks five full-size tensors per
/// norm (and one more for SiLU), which at 512 px (134 MB each for 128 channels) cost the VAE
/// decoder more in fresh pages and copies than in arithmetic. Mean, then the variance around it,
/// in f64.
struct CpuGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CpuGroupNorm {
    /// Normalises one (row, group) block `xs` of `per_group` channels into `ys`.
    fn block(&self, xs: &[f32], ys: &mut [f32], weight: &[f32], bias: &[f32]) {
        let len = xs.len() as f64;
        let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / len;
        let var = xs
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / len;
        let rstd = 1.0 / (var + self.eps).sqrt();
        let hw = xs.len() / weight.len();
        for (c, (x, y)) in xs.chunks(hw).zip(ys.chunks_mut(hw)).enumerate() {
            // y = (x - mean) * rstd * w + b = x * scale + shift
            let scale = (rstd * f64::from(weight[c])) as f32;
            let shift = (f64::from(bias[c]) - mean * rstd * f64::from(weight[c])) as f32;
            diffusionx_kernels::vmath::scale_shift(x, scale, shift, self.silu, y);
        }
    }
}

impl candle_core::CustomOp3 for CpuGroupNorm {
    fn name(&self) -> &'static str {
        "diffusionx-cpu-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let slice = |s: &candle_core::CpuStorage, l: &candle_core::Layout| -> Result<Vec<f32>> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(s.as_slice::<f32>()?[a..b].to_vec()),
                None => candle_core::bail!("group norm takes contiguous tensors"),
            }
        };
        let (weight, bias) = (slice(s2, l2)?, slice(s3, l3)?);
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("group norm takes contiguous tensors");
        };
        let xs = &s1.as_slice::<f32>()?[start..end];
        let dims = l1.shape().dims();
        let per_group = dims[1] / self.groups;
        let len = per_group * dims[2..].iter().product::<usize>();
        let mut ys = vec![0f32; xs.len()];
        par_rows(xs, len, &mut ys, len, |block, x, y| {
            let group = block % self.groups;
            let channels = group * per_group..(group + 1) * per_group;
            self.block(x, y, &weight[channels.clone()], &bias[channels]);
        });
        Ok((candle_core::CpuStorage::F32(ys), l1.shape().clone()))
    }
}

/// GEGLU of contiguous f32 on the CPU in one pass over the threads of the machine, with the
/// vectorisable GELU of [`diffusionx_kernels::vmath::gelu_erf`]: candle's composition takes libm's scalar
/// `erff` per element on one thread and writes two full-size tensors (the GELU, then the
/// product of strided halves); for one guided SD v1.5 job at 64x64 that is 42 M elements in
/// each of the five 4096-token transformer blocks.
struct CpuGeglu;

impl candle_core::CustomOp1 for CpuGeglu {
    fn name(&self) -> &'static str {
        "diffusionx-cpu-geglu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("geglu takes a contiguous tensor");
        };
        let xs = &storage.as_slice::<f32>()?[start..end];
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("geglu takes a tensor of rank 1 or more");
        };
        let inner = *last / 2;
        *last = inner;
        let mut ys = vec![0f32; xs.len() / 2];
        par_rows(xs, 2 * inner, &mut ys, inner, |_, x, y| {
            let (a, g) = x.split_at(inner);
            diffusionx_kernels::vmath::geglu(a, g, y);
        });
        Ok((
            candle_core::CpuStorage::F32(ys),
            candle_core::Shape::from(dims),
        ))
    }
}

/// Runs `f(row, input, output)` over the rows of `xs` (`in_len` values each) and `ys` (`out_len`
/// each), the rows dealt out in contiguous runs to the threads of the machine; `row` counts from
/// the first row of `xs`. Nothing runs when either length is 0.
fn par_rows(
    xs: &[f32],
    in_len: usize,
    ys: &mut [f32],
    out_len: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) {
    let rows = xs.len().checked_div(in_len).unwrap_or(0);
    if rows == 0 || out_len == 0 {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        for (t, (xs, ys)) in xs
            .chunks(per_thread * in_len)
            .zip(ys.chunks_mut(per_thread * out_len))
            .enumerate()
        {
            scope.spawn(move || {
                for (i, (x, y)) in xs
                    .chunks_exact(in_len)
                    .zip(ys.chunks_exact_mut(out_len))
                    .enumerate()
                {
                    f(t * per_thread + i, x, y);
                }
            });
        }
    });
}

/// diffusers' `Linear` (candle's), with the bias added by [`add_last_bias`].
pub(crate) struct Linear {
    product: nn::Linear,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(i: usize, o: usize, vs: nn::VarBuilder<'_>) -> Result<Self> {
        let layer = nn::linear(i, o, vs)?;
        Ok(Self {
            product: nn::Linear::new(layer.weight().clone(), None),
            bias: layer.bias().cloned(),
        })
    }

    /// A layer of `weight` `[out, in]` and `bias`.
    pub(crate) fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            product: nn::Linear::new(weight, None),
            bias,
        }
    }

    pub(crate) fn no_bias(i: usize, o: usize, vs: nn::VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            product: nn::linear_no_bias(i, o, vs)?,
            bias: None,
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.product.forward(xs)?;
        match &self.bias {
            Some(bias) => add_last_bias(&ys, bias),
            None => Ok(ys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn random(shape: &[usize], device: &Device, dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(device)
            .unwrap()
    }

    fn vars(entries: &[(&str, Tensor)], device: &Device) -> nn::VarBuilder<'static> {
        let map: HashMap<String, Tensor> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        nn::VarBuilder::from_tensors(map, entries[0].1.dtype(), device)
    }

    /// On the CPU GroupNorm is one pass ([`CpuGroupNorm`]) in f32, within 1e-5 of candle's
    /// composition, and candle's in f16; GEGLU in f32 is one pass too ([`CpuGeglu`], within
    /// 3e-7 (1 + |g|) |a|); the other layers are candle's composition, bit for bit.
    #[test]
    fn on_the_cpu_the_layers_are_candles() {
        let cpu = Device::Cpu;
        // An offset, as activations have, to catch a one-pass variance; 4 groups of 2 channels.
        let xs = (random(&[2, 8, 5, 3], &cpu, DType::F32) + 3.0).unwrap();
        let (w, b) = (
            random(&[8], &cpu, DType::F32),
            random(&[8], &cpu, DType::F32),
        );
        let norm = GroupNorm::new(
            4,
            8,
            1e-5,
            vars(&[("weight", w.clone()), ("bias", b.clone())], &cpu),
        )
        .unwrap();
        let candle = nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap();
        let expected = candle.forward(&xs).unwrap();
        let ours = norm.forward(&xs).unwrap();
        assert_eq!(ours.dims(), xs.dims());
        assert!(max_diff(&ours, &expected) < 1e-5);
        let expected_silu = nn::ops::silu(&expected).unwrap();
        assert!(max_diff(&norm.forward_silu(&xs).unwrap(), &expected_silu) < 1e-5);
        // A row's groups are normalised apart: changing one group of one row moves nothing else.
        let changed = xs
            .slice_assign(
                &[0..1, 2..4, 0..5, 0..3],
                &xs.narrow(0, 0, 1)
                    .unwrap()
                    .narrow(1, 2, 2)
                    .unwrap()
                    .sqr()
                    .unwrap(),
            )
            .unwrap();
        let moved = (norm.forward(&changed).unwrap() - &ours)
            .unwrap()
            .abs()
            .unwrap();
        let moved_per_group = moved.reshape((2, 4, 30)).unwrap().max(2).unwrap();
        let moved: Vec<Vec<f32>> = moved_per_group
            .gt(1e-4)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(moved, vec![vec![0.0, 1.0, 0.0, 0.0], vec![0.0; 4]]);

        let half = xs.to_dtype(DType::F16).unwrap();
        let norm16 = GroupNorm::new(
            4,
            8,
            1e-5,
            vars(
                &[
                    ("weight", w.to_dtype(DType::F16).unwrap()),
                    ("bias", b.to_dtype(DType::F16).unwrap()),
                ],
                &cpu,
            ),
        )
        .unwrap();
        let candle16 = nn::GroupNorm::new(
            w.to_dtype(DType::F16).unwrap(),
            b.to_dtype(DType::F16).unwrap(),
            8,
            4,
            1e-5,
        )
        .unwrap();
        assert_eq!(
            max_diff(
                &norm16.forward(&half).unwrap(),
                &candle16.forward(&half).unwrap()
            ),
            0.0
        );

        let tokens = random(&[2, 6, 8], &cpu, DType::F32);
        let weight = random(&[4, 8], &cpu, DType::F32);
        let bias = random(&[4], &cpu, DType::F32);
        let linear = Linear::new(
            8,
            4,
            vars(&[("weight", weight.clone()), ("bias", bias.clone())], &cpu),
        )
        .unwrap();
        let candle = nn::Linear::new(weight, Some(bias));
        assert_eq!(
            max_diff(
                &linear.forward(&tokens).unwrap(),
                &candle.forward(&tokens).unwrap()
            ),
            0.0
        );

        let t = random(&[2, 8], &cpu, DType::F32);
        let expected = (&xs
            + t.reshape((2, 8, 1, 1))
                .unwrap()
                .broadcast_as(xs.shape())
                .unwrap())
        .unwrap();
        assert_eq!(max_diff(&add_per_channel(&xs, &t).unwrap(), &expected), 0.0);
        let expected = (&xs
            + b.reshape((1, 8, 1, 1))
                .unwrap()
                .broadcast_as(xs.shape())
                .unwrap())
        .unwrap();
        assert_eq!(
            max_diff(&add_channel_bias(&xs, &b).unwrap(), &expected),
            0.0
        );

        let projected = random(&[2, 6, 8], &cpu, DType::F32);
        let a = projected.narrow(2, 0, 4).unwrap();
        let g = projected.narrow(2, 4, 4).unwrap();
        let expected = (&a * g.gelu_erf().unwrap()).unwrap();
        // One pass with the vectorisable GELU: within 3e-7 (1 + |g|) |a| of candle's.
        let ours = geglu(&projected).unwrap();
        assert_eq!(ours.dims(), &[2, 6, 4]);
        let diff = max_diff(&ours, &expected);
        assert!(diff < 5e-6, "{diff}");
        // Rows larger than the threads' share, and a GELU over the activations' whole range.
        let wide = (random(&[3, 77, 2 * 640], &cpu, DType::F32) * 2.0).unwrap();
        let (a, g) = (
            wide.narrow(2, 0, 640).unwrap(),
            wide.narrow(2, 640, 640).unwrap(),
        );
        let expected = (&a * g.gelu_erf().unwrap()).unwrap();
        let diff = max_diff(&geglu(&wide).unwrap(), &expected);
        assert!(diff < 4e-5, "{diff}");
        // f16 on the CPU is candle's composition, bit for bit.
        let half = projected.to_dtype(DType::F16).unwrap();
        let (a, g) = (half.narrow(2, 0, 4).unwrap(), half.narrow(2, 4, 4).unwrap());
        let expected = (a * g.gelu_erf().unwrap()).unwrap();
        assert_eq!(max_diff(&geglu(&half).unwrap(), &expected), 0.0);
    }

    /// Every kernel of [`crate::cuda`] against candle's composition on the same GPU, in f32 and
    /// f16, on shapes of the SD v1.5 UNet (and odd ones). Run on a GPU machine by
    /// tools/bench/gpu.sh; with the `cuda` feature and no GPU it fails.
    #[cfg(feature = "cuda")]
    mod on_cuda {
        use super::*;
        use crate::cuda::Kernel;

        fn gpu() -> Device {
            Device::new_cuda(0).expect("these tests need an NVIDIA GPU")
        }

        /// The bound for a kernel's result against candle's, relative to the largest value.
        fn bound(dtype: DType) -> f32 {
            if dtype == DType::F16 { 4e-3 } else { 1e-4 }
        }

        fn check(name: &str, got: &Tensor, expected: &Tensor, dtype: DType) {
            let scale = max_diff(expected, &expected.zeros_like().unwrap()).max(1.0);
            let diff = max_diff(got, expected);
            println!("{name} {dtype:?}: max diff {diff:.3e} (scale {scale:.3})");
            assert_eq!(got.dims(), expected.dims(), "{name}");
            assert!(
                diff <= bound(dtype) * scale,
                "{name} {dtype:?}: {diff} > {}",
                bound(dtype) * scale
            );
        }

        #[test]
        fn add_matches_candle() {
            assert!(Kernel::Add.enabled());
            let dev = gpu();
            for dtype in [DType::F32, DType::F16] {
                for (n, c, h, w) in [(16, 320, 64, 64), (3, 5, 7, 11)] {
                    let xs = random(&[n, c, h, w], &dev, dtype);
                    let b = random(&[c], &dev, dtype);
                    let t = random(&[n, c], &dev, dtype);
                    let expected = xs.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
                    check(
                        "channel bias",
                        &add_channel_bias(&xs, &b).unwrap(),
                        &expected,
                        dtype,
                    );
                    let expected = xs.broadcast_add(&t.reshape((n, c, 1, 1)).unwrap()).unwrap();
                    check(
                        "per channel",
                        &add_per_channel(&xs, &t).unwrap(),
                        &expected,
                        dtype,
                    );
                    let tokens = random(&[n, h * w, c], &dev, dtype);
                    let expected = tokens.broadcast_add(&b).unwrap();
                    check(
                        "last bias",
                        &add_last_bias(&tokens, &b).unwrap(),
                        &expected,
                        dtype,
                    );
                }
            }
        }

        #[test]
        fn group_norm_matches_candle() {
            assert!(Kernel::GroupNorm.enabled());
            let dev = gpu();
            for dtype in [DType::F32, DType::F16] {
                for (n, c, h, w, groups) in
                    [(2, 320, 64, 64, 32), (16, 1280, 8, 8, 32), (3, 6, 5, 7, 3)]
                {
                    // An offset, as activations have, to catch a one-pass variance.
                    let xs = (random(&[n, c, h, w], &dev, dtype) + 3.0).unwrap();
                    let (wt, b) = (random(&[c], &dev, dtype), random(&[c], &dev, dtype));
                    let norm = GroupNorm::new(
                        groups,
                        c,
                        1e-6,
                        vars(&[("weight", wt.clone()), ("bias", b.clone())], &dev),
                    )
                    .unwrap();
                    let candle = nn::GroupNorm::new(wt, b, c, groups, 1e-6).unwrap();
                    let expected = candle.forward(&xs).unwrap();
                    check("group norm", &norm.forward(&xs).unwrap(), &expected, dtype);
                    let expected = nn::ops::silu(&expected).unwrap();
                    check(
                        "group norm + silu",
                        &norm.forward_silu(&xs).unwrap(),
                        &expected,
                        dtype,
                    );
                }
            }
        }

        #[test]
        fn geglu_matches_candle() {
            assert!(Kernel::Geglu.enabled());
            let dev = gpu();
            for dtype in [DType::F32, DType::F16] {
                for shape in [[2, 4096, 2560], [3, 7, 10]] {
                    let xs = random(&shape, &dev, dtype);
                    let halves = xs.chunk(2, D::Minus1).unwrap();
                    let expected = (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap();
                    check("geglu", &geglu(&xs).unwrap(), &expected, dtype);
                }
            }
        }

        #[test]
        fn softmax_matches_candle() {
            assert!(Kernel::Softmax.enabled());
            let dev = gpu();
            for dtype in [DType::F32, DType::F16] {
                // Rows held in registers (4096, 77) and longer ones read three times (5000).
                for shape in [[16, 4096, 4096], [16, 4096, 77], [3, 5, 5000]] {
                    let xs = (random(&shape, &dev, dtype) * 4.0).unwrap();
                    let expected =
                        nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32).unwrap()).unwrap();
                    let got = softmax_last_dim(&xs).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    check("softmax", &got, &expected, dtype);
                }
            }
        }

        #[test]
        fn im2col_convolution_matches_candle() {
            assert!(Kernel::Im2col.enabled());
            let dev = gpu();
            for dtype in [DType::F32, DType::F16] {
                for (n, c, o, h, w, k, pad) in [
                    (2, 320, 320, 64, 64, 3, 1),
                    (3, 5, 4, 7, 6, 3, 1),
                    (2, 640, 320, 8, 8, 1, 0),
                    (2, 4, 3, 6, 6, 3, 0),
                ] {
                    let xs = random(&[n, c, h, w], &dev, dtype);
                    let weight = (random(&[o, c, k, k], &dev, dtype)
                        * (1.0 / ((c * k * k) as f64).sqrt()))
                    .unwrap();
                    let bias = random(&[o], &dev, dtype);
                    let config = nn::Conv2dConfig {
                        padding: pad,
                        ..Default::default()
                    };
                    let candle = nn::Conv2d::new(weight.clone(), Some(bias.clone()), config);
                    let conv = crate::resnet::Conv2d::new(
                        vars(&[("weight", weight), ("bias", bias)], &dev),
                        c,
                        o,
                        k,
                        config,
                    )
                    .unwrap();
                    let expected = candle.forward(&xs).unwrap();
                    check("convolution", &conv.forward(&xs).unwrap(), &expected, dtype);
                }
            }
        }
    }
}
