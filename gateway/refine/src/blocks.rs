//! The UNet's cross-attention blocks with the attention in the model's own precision.
//!
//! candle-transformers 0.11.1's `CrossAttention` (without its `flash-attn` feature) casts q, k
//! and v to f32 and materialises the scores in f32: on an H100 in f16 that was 35% of a UNet
//! call's kernel time (`softmax_f32` 20%, f32 FFMA matrix products 15%; docs/benchmarks.md). Here
//! the products run in the model's dtype (cuBLAS f16 on tensor cores, accumulating in f32) and
//! the scale is folded into q. The softmax accumulates in f32 everywhere
//! ([`crate::fused::softmax_last_dim`]: the crate's kernel on a GPU; on the CPU, whose f16 kernel
//! would sum 4096 terms in f16, the scores are widened to f32 first, so that the CPU f16 tests
//! see the GPU's arithmetic). On the CPU in f32 the attention is [`crate::attention`]'s, in
//! blocks of queries without the score matrix in memory. Norms, bias adds and GEGLU are
//! [`crate::fused`]'s.
//!
//! The rest is the same composition as candle-transformers' `attention.rs` and
//! `unet_2d_blocks.rs` (Apache-2.0/MIT), built from the same diffusers names, with the resnets
//! and samplers of [`crate::resnet`]. GEGLU uses the exact (erf) GELU, as diffusers does.

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::resnet::ResnetBlock2DConfig;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownBlock2DConfig, UpBlock2DConfig,
};

use crate::attention::attention;
use crate::fused::{GroupNorm, Linear, geglu};
use crate::resnet::{Conv2d, Down, Resnet, Up};

struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    fn new(
        vs: nn::VarBuilder<'_>,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let inner_dim = dim_head * heads;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::no_bias(query_dim, inner_dim, vs.pp("to_q"))?,
            to_k: Linear::no_bias(context_dim, inner_dim, vs.pp("to_k"))?,
            to_v: Linear::no_bias(context_dim, inner_dim, vs.pp("to_v"))?,
            to_out: Linear::new(inner_dim, query_dim, vs.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        })
    }

    /// `[b, n, h * d]` -> `[b * h, n, d]`.
    fn heads_to_batch(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        xs.reshape((b, n, self.heads, dim / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, n, dim / self.heads))
    }

    /// `[b * h, n, d]` -> `[b, n, h * d]`.
    fn batch_to_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (bh, n, d) = xs.dims3()?;
        xs.reshape((bh / self.heads, self.heads, n, d))?
            .transpose(1, 2)?
            .reshape((bh / self.heads, n, d * self.heads))
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs).contiguous()?;
        let q = self.heads_to_batch(&(self.to_q.forward(xs)? * self.scale)?)?;
        let k = self.heads_to_batch(&self.to_k.forward(&context)?)?;
        let v = self.heads_to_batch(&self.to_v.forward(&context)?)?;
        let out = attention(&q, &k, &v)?;
        self.to_out.forward(&self.batch_to_heads(&out)?)
    }
}

struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vs: nn::VarBuilder<'_>, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        let vs = vs.pp("net");
        Ok(Self {
            proj: Linear::new(dim, inner * 2, vs.pp("0").pp("proj"))?,
            out: Linear::new(inner, dim, vs.pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(xs)?)?)
    }
}

struct TransformerBlock {
    attn1: CrossAttention,
    attn2: CrossAttention,
    ff: FeedForward,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
}

impl TransformerBlock {
    fn new(
        vs: nn::VarBuilder<'_>,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            attn1: CrossAttention::new(vs.pp("attn1"), dim, None, heads, dim_head)?,
            attn2: CrossAttention::new(vs.pp("attn2"), dim, Some(context_dim), heads, dim_head)?,
            ff: FeedForward::new(vs.pp("ff"), dim)?,
            norm1: nn::layer_norm(dim, 1e-5, vs.pp("norm1"))?,
            norm2: nn::layer_norm(dim, 1e-5, vs.pp("norm2"))?,
            norm3: nn::layer_norm(dim, 1e-5, vs.pp("norm3"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// The shape of one block's transformers (diffusers' `Transformer2DModel`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerShape {
    pub(crate) depth: usize,
    pub(crate) groups: usize,
    pub(crate) heads: usize,
    pub(crate) context_dim: usize,
    pub(crate) linear_projection: bool,
}

/// diffusers' `Transformer2DModel` (candle's `SpatialTransformer`).
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn new(vs: nn::VarBuilder<'_>, channels: usize, shape: TransformerShape) -> Result<Self> {
        let dim_head = channels / shape.heads;
        let inner = shape.heads * dim_head;
        let proj = |name: &str, i: usize, o: usize| -> Result<Proj> {
            Ok(if shape.linear_projection {
                Proj::Linear(Linear::new(i, o, vs.pp(name))?)
            } else {
                Proj::Conv(Conv2d::new(vs.pp(name), i, o, 1, Default::default())?)
            })
        };
        let vs_blocks = vs.pp("transformer_blocks");
        Ok(Self {
            norm: GroupNorm::new(shape.groups, channels, 1e-6, vs.pp("norm"))?,
            proj_in: proj("proj_in", channels, inner)?,
            blocks: (0..shape.depth)
                .map(|i| {
                    TransformerBlock::new(
                        vs_blocks.pp(i.to_string()),
                        inner,
                        shape.heads,
                        dim_head,
                        shape.context_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out", inner, channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.transpose(1, 2)?.t()?.reshape((b, h * w, c))
        };
        let mut hidden = match &self.proj_in {
            Proj::Conv(p) => tokens(&p.forward(&normed)?)?,
            Proj::Linear(p) => p.forward(&tokens(&normed)?)?,
        };
        for block in &self.blocks {
            hidden = block.forward(&hidden, context)?;
        }
        let image = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.t()?.transpose(1, 2)
        };
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&image(&hidden)?)?,
            Proj::Linear(p) => image(&p.forward(&hidden)?)?,
        };
        out + xs
    }
}

fn transformers(
    vs: nn::VarBuilder<'_>,
    n: usize,
    channels: usize,
    shape: TransformerShape,
) -> Result<Vec<SpatialTransformer>> {
    let vs = vs.pp("attentions");
    (0..n)
        .map(|i| SpatialTransformer::new(vs.pp(i.to_string()), channels, shape))
        .collect()
}

/// diffusers' `CrossAttnDownBlock2D`: (resnet, transformer) pairs, then an optional downsampler.
pub(crate) struct CrossAttnDown {
    /// A `DownBlock2D`: the resnets and the downsampler.
    down: Down,
    attentions: Vec<SpatialTransformer>,
}

impl CrossAttnDown {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        in_channels: usize,
        out_channels: usize,
        temb_channels: usize,
        config: DownBlock2DConfig,
        shape: TransformerShape,
    ) -> Result<Self> {
        let down = Down::new(
            vs.clone(),
            in_channels,
            out_channels,
            Some(temb_channels),
            config,
        )?;
        Ok(Self {
            down,
            attentions: transformers(vs, config.num_layers, out_channels, shape)?,
        })
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut states = Vec::with_capacity(self.attentions.len() + 1);
        let mut xs = xs.clone();
        for (resnet, attn) in self.down.resnets().iter().zip(&self.attentions) {
            xs = attn.forward(&resnet.forward(&xs, Some(temb))?, context)?;
            states.push(xs.clone());
        }
        if let Some(out) = self.down.downsample(&xs)? {
            states.push(out.clone());
            xs = out;
        }
        Ok((xs, states))
    }
}

/// diffusers' `CrossAttnUpBlock2D`: (resnet over the skip concatenation, transformer) pairs, then
/// an optional upsampler.
pub(crate) struct CrossAttnUp {
    /// An `UpBlock2D`: the resnets and the upsampler.
    resnets: Up,
    attentions: Vec<SpatialTransformer>,
}

impl CrossAttnUp {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        channels: (usize, usize, usize),
        temb_channels: usize,
        config: UpBlock2DConfig,
        shape: TransformerShape,
    ) -> Result<Self> {
        let resnets = Up::new(vs.clone(), channels, Some(temb_channels), config)?;
        Ok(Self {
            attentions: transformers(vs, config.num_layers, channels.2, shape)?,
            resnets,
        })
    }

    /// Resnets this block takes skip connections for.
    pub(crate) fn n_resnets(&self) -> usize {
        self.resnets.resnets().len()
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        upsample_size: Option<(usize, usize)>,
        context: &Tensor,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (index, (resnet, attn)) in self
            .resnets
            .resnets()
            .iter()
            .zip(&self.attentions)
            .enumerate()
        {
            xs = Tensor::cat(&[&xs, &skips[skips.len() - index - 1]], 1)?.contiguous()?;
            xs = attn.forward(&resnet.forward(&xs, Some(temb))?, context)?;
        }
        self.resnets.upsample(xs, upsample_size)
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn`: a resnet, then (transformer, resnet) pairs.
pub(crate) struct CrossAttnMid {
    resnet: Resnet,
    pairs: Vec<(SpatialTransformer, Resnet)>,
}

impl CrossAttnMid {
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        channels: usize,
        temb_channels: usize,
        eps: f64,
        output_scale_factor: f64,
        shape: TransformerShape,
    ) -> Result<Self> {
        let resnet_cfg = ResnetBlock2DConfig {
            eps,
            groups: shape.groups,
            output_scale_factor,
            temb_channels: Some(temb_channels),
            ..Default::default()
        };
        let vs_resnets = vs.pp("resnets");
        let vs_attns = vs.pp("attentions");
        let resnet = Resnet::new(vs_resnets.pp("0"), channels, resnet_cfg)?;
        // diffusers' mid block has one transformer (num_layers = 1).
        let pairs = vec![(
            SpatialTransformer::new(vs_attns.pp("0"), channels, shape)?,
            Resnet::new(vs_resnets.pp("1"), channels, resnet_cfg)?,
        )];
        Ok(Self { resnet, pairs })
    }

    pub(crate) fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet.forward(xs, Some(temb))?;
        for (attn, resnet) in &self.pairs {
            xs = resnet.forward(&attn.forward(&xs, context)?, Some(temb))?;
        }
        Ok(xs)
    }
}
