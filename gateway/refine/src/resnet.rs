//! The UNet's resnets, samplers and 3x3 convolutions, with a CPU convolution that is one matrix
//! product.
//!
//! candle 0.11.1 runs a 3x3 convolution on the CPU as a tiled im2col: on every call it re-lays
//! the kernel out as `[out, kh, kw, in]`, copies the input to NHWC, gathers each tile's patches
//! element by element and scatters the product back to NCHW. [`Conv2d`] instead stacks the
//! nine shifted views of the padded input (`[batch, in, 3x3, h, w]`, whole rows copied) and
//! multiplies the weights as they are stored (`[out, in x 3 x 3]`) by it: one matrix product per
//! batch slice, nothing re-laid out, the output already NCHW. Measured on one core of the
//! benchmark machine for the SD v1.5 shapes (2 rows; docs/benchmarks.md): 1.5-2.3x faster
//! (320 channels at 64x64: 516 -> 327 ms; 1280 at 8x8: 105 -> 49 ms), the same values to 1e-5.
//! Strided, dilated, grouped and 1x1 convolutions, and every convolution on a GPU, stay candle's.
//!
//! The blocks are the same composition as candle-transformers' `resnet.rs` and
//! `unet_2d_blocks.rs` (Apache-2.0/MIT), built from the same diffusers names.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn as nn;
use diffusionx_kernels::{Bands, ConvShape, ConvWeights, UpsampledConv, conv2d, conv2d_upsampled};

use crate::fused::{GroupNorm, Linear, add_channel_bias, add_per_channel};
use candle_transformers::models::stable_diffusion::resnet::ResnetBlock2DConfig;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownBlock2DConfig, UpBlock2DConfig,
};

/// The most bytes one stacked-views buffer may take; a batch whose buffer would be larger is
/// convolved a slice of rows at a time, an image larger still a band of output lines at a time.
/// Measured on the benchmark machine (full-size SD v1.5 VAE decode at 512 px, one image): 128
/// MiB 39.5 s, 32 MiB 31.2 s, 8 MiB 35.2 s; the UNet at 64x64 moved by under 2%. A
/// convolution whose weights take 2 MiB or less (the VAE decoder's 128-channel ones) takes bands
/// that stay in the cache instead ([`ConvShape::band_bytes`]).
const MAX_COLUMNS_BYTES: usize = 32 << 20;

/// The same bound on a GPU, where the columns of a 16-row call at 64x64 (377 MiB in f16) fit.
const MAX_GPU_COLUMNS_BYTES: usize = 1 << 30;

/// A 2-D convolution loaded from `weight` and `bias` under its diffusers name.
pub(crate) struct Conv2d {
    /// candle's convolution without the bias, which [`add_channel_bias`] adds.
    inner: nn::Conv2d,
    bias: Option<Tensor>,
    /// The weights viewed as `[out, in x kh x kw]` (the same storage).
    matrix: Tensor,
    kernel: usize,
    /// For a 3x3 convolution of upsampled images on the CPU ([`Conv2d::forward_upsampled`]): the
    /// four phases' 2x2 weights, `[4 x out, in x 2 x 2]`, made on first use.
    phases: std::sync::OnceLock<Tensor>,
}

impl Conv2d {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: nn::Conv2dConfig,
    ) -> Result<Self> {
        let loaded = nn::conv2d(in_channels, out_channels, kernel, config, vs)?;
        let matrix = loaded
            .weight()
            .reshape((out_channels, in_channels * kernel * kernel))?;
        Ok(Self {
            inner: nn::Conv2d::new(loaded.weight().clone(), None, config),
            bias: loaded.bias().cloned(),
            matrix,
            kernel,
            phases: std::sync::OnceLock::new(),
        })
    }

    /// This convolution of `xs` upsampled 2x by nearest neighbour. A 3x3 convolution with
    /// padding 1 of f32 images on the CPU runs on `xs` itself, as the 2x2 convolution of its four
    /// phases ([`diffusionx_kernels::upsampled`]: 16 products per input pixel instead of 36, no
    /// upsampled image); others upsample, then convolve.
    pub(crate) fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        let config = self.inner.config();
        let fused = self.kernel == 3
            && config.padding == 1
            && config.stride == 1
            && config.dilation == 1
            && config.groups == 1
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.matrix.dtype() == DType::F32;
        if !fused {
            let (_, _, h, w) = xs.dims4()?;
            return self.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?);
        }
        let phases = match self.phases.get() {
            Some(phases) => phases,
            None => {
                let (out_channels, depth) = self.matrix.dims2()?;
                let shape = UpsampledConv {
                    batch: 1,
                    channels: depth / 9,
                    height: 1,
                    width: 1,
                    out_channels,
                };
                let weights = self.matrix.flatten_all()?.to_vec1::<f32>()?;
                let phases = shape.weights(&weights).map_err(candle_core::Error::wrap)?;
                let phases =
                    Tensor::from_vec(phases, (4 * out_channels, depth / 9 * 4), xs.device())?;
                self.phases.get_or_init(|| phases)
            }
        };
        let op = CpuConv {
            kernel: 2,
            padding: 1,
            max_bytes: MAX_COLUMNS_BYTES,
            upsampled: true,
        };
        let xs = xs.contiguous()?;
        match &self.bias {
            Some(bias) => xs.apply_op3_no_bwd(phases, &bias.contiguous()?, &op),
            None => xs.apply_op2_no_bwd(phases, &op),
        }
    }

    /// Whether `xs` takes the one-product path: on the CPU for 3x3 (stacked views), on a GPU for
    /// every stride-1 convolution (the crate's im2col kernel, or none for 1x1).
    fn as_one_product(&self, xs: &Tensor) -> bool {
        let config = self.inner.config();
        let plain = config.stride == 1 && config.dilation == 1 && config.groups == 1;
        plain && (self.kernel > 1 && xs.device().is_cpu() || xs.device().is_cuda())
    }

    /// The convolution as products of the weights and columns of at most `max_bytes` each: a
    /// slice of the batch per product, or, where one image's columns are larger (a VAE decoder
    /// at 512 px: 1.2 GB of f32 for 128 channels), a band of its output rows per product.
    fn forward_as_one_product(&self, xs: &Tensor, max_bytes: usize) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            let op = CpuConv {
                kernel: self.kernel,
                padding: self.inner.config().padding,
                max_bytes,
                upsampled: false,
            };
            let (xs, weights) = (xs.contiguous()?, self.matrix.contiguous()?);
            return match &self.bias {
                Some(bias) => xs.apply_op3_no_bwd(&weights, &bias.contiguous()?, &op),
                None => xs.apply_op2_no_bwd(&weights, &op),
            };
        }
        let (batch, channels, h, w) = xs.dims4()?;
        let (k, pad) = (self.kernel, self.inner.config().padding);
        let (ho, wo) = (
            (h + 2 * pad + 1).saturating_sub(k),
            (w + 2 * pad + 1).saturating_sub(k),
        );
        let out_channels = self.matrix.dim(0)?;
        let padded = if xs.device().is_cpu() {
            xs.pad_with_zeros(D::Minus2, pad, pad)?
                .pad_with_zeros(D::Minus1, pad, pad)?
        } else {
            xs.clone()
        };
        let line_bytes = channels * k * k * wo * xs.dtype().size_in_bytes();
        let ys = if xs.device().is_cpu() && line_bytes * ho > max_bytes {
            let lines = (max_bytes / line_bytes.max(1)).clamp(1, ho);
            let mut images = Vec::with_capacity(batch);
            for b in 0..batch {
                let image = padded.narrow(0, b, 1)?;
                let mut bands = Vec::with_capacity(ho.div_ceil(lines));
                for y0 in (0..ho).step_by(lines) {
                    let n = lines.min(ho - y0);
                    let band = image.narrow(2, y0, n + k - 1)?;
                    let columns = self.stacked_views(&band, n, wo)?;
                    let product = self.matrix.broadcast_left(1)?.matmul(&columns)?;
                    bands.push(product.reshape((1, out_channels, n, wo))?);
                }
                images.push(Tensor::cat(&bands, 2)?);
            }
            Tensor::cat(&images, 0)?
        } else {
            let rows = rows_per_product(batch, line_bytes * ho, max_bytes);
            let mut parts = Vec::with_capacity(batch.div_ceil(rows));
            for start in (0..batch).step_by(rows) {
                let n = rows.min(batch - start);
                let slice = padded.narrow(0, start, n)?;
                let columns = match self.columns(&slice, pad, ho, wo)? {
                    Some(columns) => columns,
                    None => return self.forward_candle(xs),
                };
                let weights = self.matrix.broadcast_left(n)?;
                parts.push(weights.matmul(&columns)?);
            }
            Tensor::cat(&parts, 0)?.reshape((batch, out_channels, ho, wo))?
        };
        match &self.bias {
            Some(bias) => add_channel_bias(&ys, bias),
            None => Ok(ys),
        }
    }

    /// The stacked shifted views of padded `slice`, `[n, in x k x k, ho x wo]` (the CPU's
    /// columns).
    fn stacked_views(&self, slice: &Tensor, ho: usize, wo: usize) -> Result<Tensor> {
        let (n, channels, _, _) = slice.dims4()?;
        let k = self.kernel;
        let views = (0..k * k)
            .map(|tap| slice.narrow(2, tap / k, ho)?.narrow(3, tap % k, wo))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&views, 2)?.reshape((n, channels * k * k, ho * wo))
    }

    /// The `[n, in x k x k, ho x wo]` columns of `slice` (already padded on the CPU), or `None`
    /// where the GPU kernel does not take it.
    fn columns(&self, slice: &Tensor, pad: usize, ho: usize, wo: usize) -> Result<Option<Tensor>> {
        if slice.device().is_cpu() {
            return self.stacked_views(slice, ho, wo).map(Some);
        }
        let (n, channels, _, _) = slice.dims4()?;
        let k = self.kernel;
        if k == 1 && pad == 0 {
            return Ok(Some(slice.contiguous()?.reshape((n, channels, ho * wo))?));
        }
        #[cfg(feature = "cuda")]
        return crate::cuda::im2col(&slice.contiguous()?, k, pad);
        #[cfg(not(feature = "cuda"))]
        Ok(None)
    }
}

/// A stride-1 convolution of f32 images on the CPU, [`diffusionx_kernels::conv2d`]: a band of
/// output lines per product, its columns in a buffer each thread keeps, the product written
/// straight into the output on top of the bias.
struct CpuConv {
    kernel: usize,
    padding: usize,
    /// The most bytes a band's columns take.
    max_bytes: usize,
    /// A 3x3 convolution (padding 1) of the images upsampled 2x, with the phases' weights
    /// (`kernel` 2, `padding` 1: [`UpsampledConv::phases`]).
    upsampled: bool,
}

thread_local! {
    /// The columns of the band being convolved, kept from call to call: at most
    /// [`MAX_COLUMNS_BYTES`], allocated (and its pages faulted in) once per thread.
    static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CpuConv {
    fn run(
        &self,
        (xs, lx): (&CpuStorage, &Layout),
        (ws, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = lx.shape().dims4()?;
        let (out_channels, _) = lw.shape().dims2()?;
        let bias = bias.map(|(s, l)| contiguous(s, l)).transpose()?;
        let (xs, ws) = (contiguous(xs, lx)?, contiguous(ws, lw)?);
        let threads = candle_core::utils::get_num_threads();
        let bands = |conv: ConvShape| Bands {
            max_columns_bytes: conv.band_bytes(self.max_bytes),
            threads,
        };
        if self.upsampled {
            let shape = UpsampledConv {
                batch,
                channels,
                height,
                width,
                out_channels: out_channels / 4,
            };
            let dims = shape.output();
            let mut out = vec![0f32; dims.iter().product()];
            // The phases are the call's own: as large as the output, not a buffer to keep.
            let mut phases = Vec::new();
            let (ws, bands) = (ConvWeights::Plain(ws), bands(shape.phases()));
            COLUMNS
                .with_borrow_mut(|columns| {
                    conv2d_upsampled(xs, shape, ws, bias, &mut out, bands, columns, &mut phases)
                })
                .map_err(candle_core::Error::wrap)?;
            return Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())));
        }
        let shape = ConvShape {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel: self.kernel,
            padding: self.padding,
        };
        let Some((ho, wo)) = shape.output() else {
            candle_core::bail!("convolution {shape:?}: the window is larger than the image")
        };
        let mut out = vec![0f32; batch * out_channels * ho * wo];
        let bands = bands(shape);
        COLUMNS
            .with_borrow_mut(|columns| conv2d(xs, shape, ws, bias, &mut out, bands, columns))
            .map_err(candle_core::Error::wrap)?;
        let shape = Shape::from((batch, out_channels, ho, wo));
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The values of a contiguous f32 tensor.
fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("the CPU convolution takes contiguous tensors"),
    }
}

impl CustomOp2 for CpuConv {
    fn name(&self) -> &'static str {
        "diffusionx-cpu-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        ws: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, lx), (ws, lw), None)
    }
}

impl CustomOp3 for CpuConv {
    fn name(&self) -> &'static str {
        "diffusionx-cpu-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        ws: &CpuStorage,
        lw: &Layout,
        bs: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, lx), (ws, lw), Some((bs, lb)))
    }
}

/// The most bytes one columns buffer may take on `device`.
fn max_columns_bytes(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        MAX_COLUMNS_BYTES
    } else {
        MAX_GPU_COLUMNS_BYTES
    }
}

/// How many of `batch` rows one product takes when a row's columns take `row_bytes` and a
/// buffer at most `max_bytes`.
fn rows_per_product(batch: usize, row_bytes: usize, max_bytes: usize) -> usize {
    (max_bytes / row_bytes.max(1)).clamp(1, batch)
}

impl Conv2d {
    /// candle's convolution, then the bias.
    fn forward_candle(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.inner.forward(xs)?;
        match &self.bias {
            Some(bias) => add_channel_bias(&ys, bias),
            None => Ok(ys),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.as_one_product(xs) {
            self.forward_as_one_product(xs, max_columns_bytes(xs.device()))
        } else {
            self.forward_candle(xs)
        }
    }
}

pub(crate) fn conv3x3(vs: nn::VarBuilder<'_>, i: usize, o: usize, stride: usize) -> Result<Conv2d> {
    let config = nn::Conv2dConfig {
        stride,
        padding: 1,
        ..Default::default()
    };
    Conv2d::new(vs, i, o, 3, config)
}

/// diffusers' `ResnetBlock2D` (candle's, with [`Conv2d`]).
pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl Resnet {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        in_channels: usize,
        config: ResnetBlock2DConfig,
    ) -> Result<Self> {
        let out_channels = config.out_channels.unwrap_or(in_channels);
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let shortcut = config
            .use_in_shortcut
            .unwrap_or(in_channels != out_channels);
        Ok(Self {
            norm1: GroupNorm::new(config.groups, in_channels, config.eps, vs.pp("norm1"))?,
            conv1: conv3x3(vs.pp("conv1"), in_channels, out_channels, 1)?,
            norm2: GroupNorm::new(groups_out, out_channels, config.eps, vs.pp("norm2"))?,
            conv2: conv3x3(vs.pp("conv2"), out_channels, out_channels, 1)?,
            time_emb_proj: config
                .temb_channels
                .map(|t| Linear::new(t, out_channels, vs.pp("time_emb_proj")))
                .transpose()?,
            conv_shortcut: shortcut
                .then(|| {
                    let config = nn::Conv2dConfig::default();
                    Conv2d::new(vs.pp("conv_shortcut"), in_channels, out_channels, 1, config)
                })
                .transpose()?,
            output_scale_factor: config.output_scale_factor,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let hs = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let hs = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => {
                add_per_channel(&hs, &proj.forward(&nn::ops::silu(temb)?)?)?
            }
            _ => hs,
        };
        let hs = self.conv2.forward(&self.norm2.forward_silu(&hs)?)?;
        (shortcut + hs)? / self.output_scale_factor
    }
}

/// diffusers' `DownBlock2D`: resnets, then an optional stride-2 convolution.
pub(crate) struct Down {
    resnets: Vec<Resnet>,
    downsampler: Option<(Conv2d, usize)>,
}

impl Down {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: DownBlock2DConfig,
    ) -> Result<Self> {
        // As candle's DownBlock2D builds them (resnet groups at their default).
        let resnet_cfg = ResnetBlock2DConfig {
            out_channels: Some(out_channels),
            eps: config.resnet_eps,
            output_scale_factor: config.output_scale_factor,
            temb_channels,
            ..Default::default()
        };
        let vs_resnets = vs.pp("resnets");
        let resnets = (0..config.num_layers)
            .map(|i| {
                let c_in = if i == 0 { in_channels } else { out_channels };
                Resnet::new(vs_resnets.pp(i.to_string()), c_in, resnet_cfg)
            })
            .collect::<Result<_>>()?;
        let downsampler = config
            .add_downsample
            .then(|| {
                let padding = config.downsample_padding;
                let conv_cfg = nn::Conv2dConfig {
                    stride: 2,
                    padding,
                    ..Default::default()
                };
                let vs = vs.pp("downsamplers").pp("0").pp("conv");
                Conv2d::new(vs, out_channels, out_channels, 3, conv_cfg).map(|c| (c, padding))
            })
            .transpose()?;
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    pub(crate) fn resnets(&self) -> &[Resnet] {
        &self.resnets
    }

    /// The downsampler alone (`None` when there is none).
    pub(crate) fn downsample(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let Some((conv, padding)) = &self.downsampler else {
            return Ok(None);
        };
        let xs = match padding {
            // diffusers pads right and bottom by one when the convolution itself does not pad.
            0 => conv.forward(&xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                D::Minus2,
                0,
                1,
            )?)?,
            _ => conv.forward(xs)?,
        };
        Ok(Some(xs))
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, temb)?;
            states.push(xs.clone());
        }
        if let Some(down) = self.downsample(&xs)? {
            states.push(down.clone());
            xs = down;
        }
        Ok((xs, states))
    }
}

/// diffusers' `UpBlock2D`: resnets over the skip concatenation, then an optional nearest-neighbour
/// upsampling followed by a 3x3 convolution.
pub(crate) struct Up {
    resnets: Vec<Resnet>,
    upsampler: Option<Conv2d>,
}

impl Up {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        channels: (usize, usize, usize),
        temb_channels: Option<usize>,
        config: UpBlock2DConfig,
    ) -> Result<Self> {
        let (in_channels, prev_out_channels, out_channels) = channels;
        let resnet_cfg = ResnetBlock2DConfig {
            out_channels: Some(out_channels),
            temb_channels,
            eps: config.resnet_eps,
            output_scale_factor: config.output_scale_factor,
            ..Default::default()
        };
        let vs_resnets = vs.pp("resnets");
        let resnets = (0..config.num_layers)
            .map(|i| {
                let skip = if i + 1 == config.num_layers {
                    in_channels
                } else {
                    out_channels
                };
                let from = if i == 0 {
                    prev_out_channels
                } else {
                    out_channels
                };
                Resnet::new(vs_resnets.pp(i.to_string()), from + skip, resnet_cfg)
            })
            .collect::<Result<_>>()?;
        let upsampler = config
            .add_upsample
            .then(|| {
                let vs = vs.pp("upsamplers").pp("0").pp("conv");
                conv3x3(vs, out_channels, out_channels, 1)
            })
            .transpose()?;
        Ok(Self { resnets, upsampler })
    }

    pub(crate) fn resnets(&self) -> &[Resnet] {
        &self.resnets
    }

    /// The upsampler alone (identity when there is none), to `size` or twice the input's.
    pub(crate) fn upsample(&self, xs: Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let Some(conv) = &self.upsampler else {
            return Ok(xs);
        };
        let (_, _, h, w) = xs.dims4()?;
        match size {
            Some(size) if size != (2 * h, 2 * w) => {
                conv.forward(&xs.upsample_nearest2d(size.0, size.1)?)
            }
            _ => conv.forward_upsampled(&xs),
        }
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (index, resnet) in self.resnets.iter().enumerate() {
            xs = Tensor::cat(&[&xs, &skips[skips.len() - index - 1]], 1)?.contiguous()?;
            xs = resnet.forward(&xs, temb)?;
        }
        self.upsample(xs, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A 3x3 convolution `cin -> cout` with deterministic weights.
    fn conv(cin: usize, cout: usize, config: nn::Conv2dConfig) -> Result<Conv2d> {
        let device = Device::Cpu;
        let weight = Tensor::arange(0u32, (cout * cin * 9) as u32, &device)?
            .to_dtype(DType::F32)?
            .affine(0.37, 0.0)?
            .sin()?
            .reshape((cout, cin, 3, 3))?;
        let bias = Tensor::arange(0u32, cout as u32, &device)?
            .to_dtype(DType::F32)?
            .affine(0.1, -0.2)?;
        let tensors = HashMap::from([("weight".to_string(), weight), ("bias".to_string(), bias)]);
        let vs = nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
        Conv2d::new(vs, cin, cout, 3, config)
    }

    fn padded(padding: usize) -> nn::Conv2dConfig {
        nn::Conv2dConfig {
            padding,
            ..Default::default()
        }
    }

    fn input(shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::arange(0u32, n as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(0.73, 0.5)?
            .cos()?
            .reshape(shape)
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn one_product_convolves_as_candle_does() -> Result<()> {
        for pad in [0, 1] {
            let conv = conv(5, 7, padded(pad))?;
            let xs = input((3, 5, 6, 9))?;
            assert!(conv.as_one_product(&xs));
            let ours = conv.forward(&xs)?;
            let candles = conv.forward_candle(&xs)?;
            assert_eq!(ours.dims(), candles.dims());
            let worst = largest_difference(&ours, &candles)?;
            assert!(worst < 1e-5, "padding {pad}: off by {worst}");
        }
        Ok(())
    }

    #[test]
    fn an_upsampled_images_convolution_is_the_upsampling_then_candles() -> Result<()> {
        // The phases path (padding 1) and the fallback (padding 0: upsampled, then convolved).
        for pad in [1, 0] {
            let conv = conv(5, 7, padded(pad))?;
            let xs = input((2, 5, 4, 6))?;
            let ours = conv.forward_upsampled(&xs)?;
            let candles = conv.forward_candle(&xs.upsample_nearest2d(8, 12)?)?;
            assert_eq!(ours.dims(), candles.dims(), "padding {pad}");
            let worst = largest_difference(&ours, &candles)?;
            assert!(worst < 1e-5, "padding {pad}: off by {worst}");
            assert_eq!(conv.phases.get().is_some(), pad == 1, "padding {pad}");
        }
        Ok(())
    }

    #[test]
    fn an_image_too_large_for_one_buffer_is_convolved_in_bands_of_rows() -> Result<()> {
        // 5 channels x 9 taps x 11 columns x 4 bytes = 1980 bytes a line: a bound of 4000
        // bytes takes two lines per product, so 13 output lines take 7 bands (the last of one).
        for pad in [0, 1] {
            let conv = conv(5, 7, padded(pad))?;
            let xs = input((2, 5, 13 + 2 - 2 * pad, 11 + 2 - 2 * pad))?;
            let banded = conv.forward_as_one_product(&xs, 4000)?;
            let whole = conv.forward_as_one_product(&xs, usize::MAX)?;
            let candles = conv.forward_candle(&xs)?;
            assert_eq!(banded.dims(), &[2, 7, 13, 11]);
            assert_eq!(largest_difference(&banded, &whole)?, 0.0, "padding {pad}");
            let worst = largest_difference(&banded, &candles)?;
            assert!(worst < 1e-5, "padding {pad}: off by {worst}");
        }
        Ok(())
    }

    #[test]
    fn a_batch_too_large_for_one_buffer_is_convolved_in_slices() -> Result<()> {
        // 64 channels x 9 taps x 48 x 48 x 4 bytes = 5.1 MiB a row: six rows per 32 MiB slice,
        // so eight rows take two products.
        assert_eq!(
            rows_per_product(8, 64 * 9 * 48 * 48 * 4, MAX_COLUMNS_BYTES),
            6
        );
        assert_eq!(rows_per_product(8, 1 << 30, MAX_COLUMNS_BYTES), 1);
        let conv = conv(64, 2, padded(1))?;
        let xs = input((8, 64, 48, 48))?;
        let ours = conv.forward(&xs)?;
        let candles = conv.forward_candle(&xs)?;
        let worst = largest_difference(&ours, &candles)?;
        assert!(worst < 1e-4, "off by {worst}");
        Ok(())
    }

    #[test]
    fn strided_convolutions_stay_candles() -> Result<()> {
        let config = nn::Conv2dConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let conv = conv(3, 2, config)?;
        let xs = input((1, 3, 8, 8))?;
        assert!(!conv.as_one_product(&xs));
        let ours = conv.forward(&xs)?;
        assert_eq!(ours.dims(), &[1, 2, 4, 4]);
        assert_eq!(largest_difference(&ours, &conv.forward_candle(&xs)?)?, 0.0);
        Ok(())
    }
}
