//! The SD 1.x UNet with one timestep per batch row, for continuous batching.
//!
//! candle-transformers 0.11.1's `UNet2DConditionModel::forward` takes a single `f64` timestep
//! for the whole batch, so jobs at different points of their schedules could not share a UNet
//! call. This is the same composition (built from the same weights under the same names, in the
//! same order; adapted from candle-transformers' `unet_2d.rs`, Apache-2.0/MIT) with the timestep
//! embedding computed per row, in f32 as diffusers does, and the cross-attention blocks of
//! `blocks.rs` (attention in the model's precision, exact GELU); the other blocks are candle's.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownBlock2DConfig, UpBlock2DConfig,
};

use crate::blocks::{CrossAttnDown, CrossAttnMid, CrossAttnUp, TransformerShape};
use crate::fused::GroupNorm;
use crate::resnet::{Conv2d, Down as DownBlock2D, Up as UpBlock2D};

enum Down {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDown),
}

#[allow(clippy::large_enum_variant)] // Four blocks, built once per model.
enum Up {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUp),
}

/// The conditional UNet of SD 1.x, taking one timestep per batch row.
pub(crate) struct BatchUnet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<Down>,
    mid_block: CrossAttnMid,
    up_blocks: Vec<Up>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionModelConfig,
}

impl BatchUnet {
    /// Builds the UNet from `vs` (diffusers' names), as candle's `UNet2DConditionModel::new`
    /// does without flash attention.
    pub(crate) fn new(
        vs: nn::VarBuilder<'_>,
        in_channels: usize,
        out_channels: usize,
        config: UNet2DConditionModelConfig,
    ) -> Result<Self> {
        let n_blocks = config.blocks.len();
        let (Some(first), Some(last)) = (config.blocks.first(), config.blocks.last()) else {
            candle_core::bail!("the UNet config has no blocks");
        };
        let b_channels = first.out_channels;
        let bl_channels = last.out_channels;
        let time_embed_dim = b_channels * 4;
        let conv_cfg = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = Conv2d::new(vs.pp("conv_in"), in_channels, b_channels, 3, conv_cfg)?;
        let time_proj = Timesteps::new(b_channels, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vs.pp("time_embedding"), b_channels, time_embed_dim)?;

        let shape = |depth: usize, heads: usize| TransformerShape {
            depth,
            groups: config.norm_num_groups,
            heads,
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
        };
        let vs_db = vs.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n_blocks);
        for (i, block) in config.blocks.iter().enumerate() {
            let BlockConfig {
                out_channels,
                use_cross_attn,
                attention_head_dim,
            } = *block;
            let in_channels = if i > 0 {
                config.blocks[i - 1].out_channels
            } else {
                b_channels
            };
            let db_cfg = DownBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_downsample: i < n_blocks - 1,
                downsample_padding: config.downsample_padding,
                ..Default::default()
            };
            down_blocks.push(match use_cross_attn {
                Some(depth) => Down::CrossAttn(CrossAttnDown::new(
                    vs_db.pp(i.to_string()),
                    in_channels,
                    out_channels,
                    time_embed_dim,
                    db_cfg,
                    shape(depth, attention_head_dim),
                )?),
                None => Down::Basic(DownBlock2D::new(
                    vs_db.pp(i.to_string()),
                    in_channels,
                    out_channels,
                    Some(time_embed_dim),
                    db_cfg,
                )?),
            });
        }

        let mid_block = CrossAttnMid::new(
            vs.pp("mid_block"),
            bl_channels,
            time_embed_dim,
            config.norm_eps,
            config.mid_block_scale_factor,
            shape(last.use_cross_attn.unwrap_or(1), last.attention_head_dim),
        )?;

        let vs_ub = vs.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n_blocks);
        for i in 0..n_blocks {
            let BlockConfig {
                out_channels,
                use_cross_attn,
                attention_head_dim,
            } = config.blocks[n_blocks - 1 - i];
            let prev_out_channels = if i > 0 {
                config.blocks[n_blocks - i].out_channels
            } else {
                bl_channels
            };
            let in_channels = {
                let index = if i == n_blocks - 1 {
                    0
                } else {
                    n_blocks - i - 2
                };
                config.blocks[index].out_channels
            };
            let ub_cfg = UpBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_upsample: i < n_blocks - 1,
                ..Default::default()
            };
            up_blocks.push(match use_cross_attn {
                Some(depth) => Up::CrossAttn(CrossAttnUp::new(
                    vs_ub.pp(i.to_string()),
                    (in_channels, prev_out_channels, out_channels),
                    time_embed_dim,
                    ub_cfg,
                    shape(depth, attention_head_dim),
                )?),
                None => Up::Basic(UpBlock2D::new(
                    vs_ub.pp(i.to_string()),
                    (in_channels, prev_out_channels, out_channels),
                    Some(time_embed_dim),
                    ub_cfg,
                )?),
            });
        }

        let conv_norm_out = GroupNorm::new(
            config.norm_num_groups,
            b_channels,
            config.norm_eps,
            vs.pp("conv_norm_out"),
        )?;
        let conv_out = Conv2d::new(vs.pp("conv_out"), b_channels, out_channels, 3, conv_cfg)?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config,
        })
    }

    /// The noise prediction for `xs` `[b, 4, h, w]` at `timesteps` `[b]` (one per row) under
    /// `encoder_hidden_states` `[b, 77, d]`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let n_blocks = self.config.blocks.len();
        let up_factor = 1usize << (n_blocks - 1);
        let forward_upsample_size = height % up_factor != 0 || width % up_factor != 0;
        let xs = if self.config.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        // The sinusoids in f32, as diffusers computes them: in f16, `t * freq` for t near 1000
        // keeps 11 bits, so the phase of the sines is off by tenths of a radian.
        let emb = self
            .time_proj
            .forward(&timesteps.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        let emb = self.time_embedding.forward(&emb)?;
        let xs = self.conv_in.forward(&xs)?;
        let mut down_res = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down_blocks {
            let (out, res) = match block {
                Down::Basic(b) => b.forward(&xs, Some(&emb))?,
                Down::CrossAttn(b) => b.forward(&xs, &emb, encoder_hidden_states)?,
            };
            down_res.extend(res);
            xs = out;
        }
        let mut xs = self.mid_block.forward(&xs, &emb, encoder_hidden_states)?;
        let mut upsample_size = None;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n_resnets = match block {
                Up::Basic(b) => b.resnets().len(),
                Up::CrossAttn(b) => b.n_resnets(),
            };
            let res = down_res.split_off(down_res.len() - n_resnets);
            if i < n_blocks - 1
                && forward_upsample_size
                && let Some(last) = down_res.last()
            {
                let (_, _, h, w) = last.dims4()?;
                upsample_size = Some((h, w));
            }
            xs = match block {
                Up::Basic(b) => b.forward(&xs, &res, Some(&emb), upsample_size)?,
                Up::CrossAttn(b) => {
                    b.forward(&xs, &res, &emb, upsample_size, encoder_hidden_states)?
                }
            };
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
