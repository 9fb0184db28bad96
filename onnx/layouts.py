"""Model layouts: the real Tiny-SD (BK-SDM-Tiny, segmind/tiny-sd) configs and a tiny variant.

Both have the Tiny-SD UNet shape: three CrossAttnDownBlock2D / CrossAttnUpBlock2D stages, no mid
block, one resnet + transformer per down stage (two per up stage, as diffusers builds up blocks with
layers_per_block + 1). Random weights only: real weights enter through export.py.
"""

from __future__ import annotations

import torch

# Stable Diffusion v1.5's scheduler/scheduler_config.json (PNDM, as shipped), which every scheduler
# is built from with `from_config`.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    # not in the original file; these are the defaults, written out for the Rust side.
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

CROSS_ATTN_3 = ("CrossAttnDownBlock2D",) * 3
CROSS_ATTN_UP_3 = ("CrossAttnUpBlock2D",) * 3


def unet_config(full: bool) -> dict:
    return dict(
        sample_size=64 if full else 32,
        in_channels=4,
        out_channels=4,
        down_block_types=CROSS_ATTN_3,
        up_block_types=CROSS_ATTN_UP_3,
        mid_block_type=None,
        block_out_channels=(320, 640, 1280) if full else (8, 16, 16),
        layers_per_block=1,
        norm_num_groups=32 if full else 4,
        cross_attention_dim=768 if full else TINY_TEXT_HIDDEN,
        attention_head_dim=8 if full else 2,  # SD 1.x naming: this is the number of heads
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        norm_eps=1e-5,
    )


TINY_TEXT_HIDDEN = 4  # the 49408 x D token embedding dominates the fixture size


def text_config(full: bool) -> dict:
    base = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_factor=1.0,
        initializer_range=0.02,
    )
    if full:  # openai/clip-vit-large-patch14 text model
        base.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    else:
        base.update(hidden_size=TINY_TEXT_HIDDEN, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, projection_dim=TINY_TEXT_HIDDEN)
    return base


def vae_config(full: bool) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if full else (8, 8, 16, 16),
        layers_per_block=2 if full else 1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32 if full else 4,
        sample_size=512 if full else 256,
        scaling_factor=0.18215,
    )


def build(full: bool, seed: int):
    """Random-weight (text_encoder, unet, vae), seeded, float32, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**text_config(full), attn_implementation="eager"))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config(full))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_config(full))
    if not full:
        _widen_init(unet)
    return te.eval().float(), unet.eval().float(), vae.eval().float()


def _widen_init(unet) -> None:
    """A random tiny UNet predicts noise with std ~0.3; scale conv_out so it is ~1 like a trained
    model's, so scheduler mistakes show up as clearly in the references as they would for real."""
    with torch.no_grad():
        unet.conv_out.weight.mul_(UNET_OUT_GAIN)
        unet.conv_out.bias.mul_(UNET_OUT_GAIN)


UNET_OUT_GAIN = 3.0
