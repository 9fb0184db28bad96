//! The VAE decoder (diffusers' `AutoencoderKL` decoder half) on the crate's layers.
//!
//! candle-transformers 0.11.1's `AutoEncoderKL` builds the decoder from candle's convolutions and
//! GroupNorms (the CPU's tiled im2col, the GPU's strided kernels) and runs the mid-block
//! attention in f32, and it loads the encoder too, which the gateway never runs (it receives
//! latents). This is the same composition from the same diffusers names, decoder only, with
//! [`crate::resnet`]'s resnets and convolutions, [`crate::fused`]'s norms, and the attention in
//! the model's precision with the softmax accumulating in f32, as in [`crate::blocks`].

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::resnet::ResnetBlock2DConfig;

use crate::attention::attention;
use crate::fused::{GroupNorm, Linear};
use crate::resnet::{Conv2d, Resnet, conv3x3};

/// The parts of a VAE's `config.json` the decoder needs.
#[derive(Debug, Clone)]
pub(crate) struct DecoderConfig {
    pub(crate) block_out_channels: Vec<usize>,
    pub(crate) layers_per_block: usize,
    pub(crate) latent_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) norm_num_groups: usize,
    pub(crate) use_post_quant_conv: bool,
    pub(crate) mid_block_add_attention: bool,
}

/// diffusers' VAE `Attention` (one head over all channels), with a residual.
struct Attention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

/// A VAE attention projection: `to_q` (or the older `query`) as a linear layer, stored either
/// as `[c, c]` or as a 1x1 convolution `[c, c, 1, 1]`.
fn projection(vs: &nn::VarBuilder<'_>, names: [&str; 2], channels: usize) -> Result<Linear> {
    let name = if vs.contains_tensor(&format!("{}.weight", names[0])) {
        names[0]
    } else {
        names[1]
    };
    let vs = vs.pp(name);
    let weight = match vs.get((channels, channels), "weight") {
        Ok(weight) => weight,
        Err(_) => vs
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Ok(Linear::from_parts(weight, Some(vs.get(channels, "bias")?)))
}

impl Attention {
    fn new(vs: nn::VarBuilder<'_>, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, channels, eps, vs.pp("group_norm"))?,
            to_q: projection(&vs, ["to_q", "query"], channels)?,
            to_k: projection(&vs, ["to_k", "key"], channels)?,
            to_v: projection(&vs, ["to_v", "value"], channels)?,
            to_out: projection(&vs, ["to_out.0", "proj_attn"], channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = (self.to_q.forward(&tokens)? * self.scale)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let attended = attention(&q, &k, &v)?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then an optional nearest-neighbour 2x upsampling
/// followed by a 3x3 convolution.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsampler: Option<Conv2d>,
}

/// The post-quantisation convolution and the decoder: latents `[n, 4, h, w]` to images
/// `[n, 3, 8h, 8w]` in [-1, 1] (before clamping).
pub(crate) struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (Resnet, Option<Attention>, Resnet),
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Builds the decoder from the VAE's weights (`decoder.*` and `post_quant_conv.*`).
    pub(crate) fn new(vs: nn::VarBuilder<'_>, config: &DecoderConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let (Some(&first), Some(&last)) = (channels.first(), channels.last()) else {
            candle_core::bail!("the VAE's block_out_channels is empty");
        };
        let groups = config.norm_num_groups;
        let eps = 1e-6;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| {
                let c = config.latent_channels;
                Conv2d::new(vs.pp("post_quant_conv"), c, c, 1, Default::default())
            })
            .transpose()?;
        let vs = vs.pp("decoder");
        let resnet = |vs: nn::VarBuilder<'_>, cin: usize, cout: usize| {
            let config = ResnetBlock2DConfig {
                out_channels: Some(cout),
                groups,
                eps,
                temb_channels: None,
                output_scale_factor: 1.0,
                ..Default::default()
            };
            Resnet::new(vs, cin, config)
        };
        let vs_mid = vs.pp("mid_block");
        let mid = (
            resnet(vs_mid.pp("resnets").pp("0"), last, last)?,
            config
                .mid_block_add_attention
                .then(|| Attention::new(vs_mid.pp("attentions").pp("0"), last, groups, eps))
                .transpose()?,
            resnet(vs_mid.pp("resnets").pp("1"), last, last)?,
        );
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(index, &out)| {
                let vs = vs.pp("up_blocks").pp(index.to_string());
                let cin = if index == 0 { out } else { reversed[index - 1] };
                let resnets = (0..=config.layers_per_block)
                    .map(|i| {
                        let from = if i == 0 { cin } else { out };
                        resnet(vs.pp("resnets").pp(i.to_string()), from, out)
                    })
                    .collect::<Result<_>>()?;
                let upsampler = (index + 1 < reversed.len())
                    .then(|| conv3x3(vs.pp("upsamplers").pp("0").pp("conv"), out, out, 1))
                    .transpose()?;
                Ok(UpBlock { resnets, upsampler })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            post_quant_conv,
            conv_in: conv3x3(vs.pp("conv_in"), config.latent_channels, last, 1)?,
            mid,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, first, eps, vs.pp("conv_norm_out"))?,
            conv_out: conv3x3(vs.pp("conv_out"), first, config.out_channels, 1)?,
        })
    }

    /// Decodes latents (already divided by the scaling factor).
    pub(crate) fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let xs = self.conv_in.forward(&xs)?;
        let (first, attention, second) = &self.mid;
        let mut xs = first.forward(&xs, None)?;
        if let Some(attention) = attention {
            xs = attention.forward(&xs)?;
        }
        xs = second.forward(&xs, None)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(conv) = &block.upsampler {
                xs = conv.forward_upsampled(&xs)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// Older VAEs name the attention's projections `query`, `key`, `value`, `proj_attn`, and
    /// some store them as 1x1 convolutions: each loads as the same linear layer.
    #[test]
    fn projections_load_from_either_name_and_shape() -> Result<()> {
        let device = Device::Cpu;
        let c = 3;
        let weight = Tensor::arange(0f32, 9.0, &device)?.reshape((c, c))?;
        let bias = Tensor::new(&[0.5f32, -1.0, 2.0], &device)?;
        let xs = Tensor::new(&[[[1f32, 2.0, 3.0], [-1.0, 0.0, 4.0]]], &device)?;
        // x W^T + b, by hand.
        let expected = [[8.5f32, 25.0, 46.0], [8.5, 16.0, 28.0]];
        for (name, stored) in [
            ("to_q", weight.clone()),
            ("query", weight.reshape((c, c, 1, 1))?),
        ] {
            let tensors = HashMap::from([
                (format!("{name}.weight"), stored),
                (format!("{name}.bias"), bias.clone()),
            ]);
            let vs = nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
            let layer = projection(&vs, ["to_q", "query"], c)?;
            let got: Vec<Vec<f32>> = layer.forward(&xs)?.squeeze(0)?.to_vec2()?;
            assert_eq!(got, expected, "{name}");
        }
        Ok(())
    }
}
