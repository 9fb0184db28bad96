"""Model layouts for the gateway: Stable Diffusion v1.5 (runwayml) configs and a tiny variant.

The SD v1.5 UNet: three CrossAttnDownBlock2D stages and a plain DownBlock2D, a
UNetMidBlock2DCrossAttn, then UpBlock2D and three CrossAttnUpBlock2D; two resnets (+ transformers)
per down stage, three per up stage (diffusers builds up blocks with layers_per_block + 1). The text
encoder (CLIP ViT-L/14) and the VAE configs are shared with the kiosk's layouts.py. Random weights
only: real weights are loaded by the gateway from a diffusers folder, never made here.
"""

from __future__ import annotations

import torch

import layouts

DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# candle-transformers 0.11.1's DownBlock2D/UpBlock2D resnets always use 32 groups (they ignore
# the configured `norm_num_groups`), so the tiny UNet uses 32 groups and 32 channels throughout to
# stay comparable with diffusers. The VAE passes its groups through, so it stays smaller.
TINY_BLOCK_OUT_CHANNELS = (32, 32, 32, 32)
TINY_UNET_NORM_GROUPS = 32
TINY_VAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16)
TINY_NORM_GROUPS = 4
TINY_HEADS = 2
# A random tiny UNet predicts noise with std ~0.3; conv_out is scaled so it is ~1 like a trained
# model's (as layouts.UNET_OUT_GAIN for the kiosk fixture).
UNET_OUT_GAIN = 3.0

# runwayml/stable-diffusion-v1-5 unet/diffusion_pytorch_model: 859,520,964 parameters.
SD15_UNET_PARAMS = 859_520_964


def unet_config(full: bool) -> dict:
    return dict(
        sample_size=64 if full else 32,
        in_channels=4,
        out_channels=4,
        down_block_types=DOWN_BLOCKS,
        mid_block_type=MID_BLOCK,
        up_block_types=UP_BLOCKS,
        block_out_channels=(320, 640, 1280, 1280) if full else TINY_BLOCK_OUT_CHANNELS,
        layers_per_block=2,
        norm_num_groups=32 if full else TINY_UNET_NORM_GROUPS,
        norm_eps=1e-5,
        cross_attention_dim=768 if full else layouts.TINY_TEXT_HIDDEN,
        attention_head_dim=8 if full else TINY_HEADS,  # SD 1.x naming: the number of heads
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        use_linear_projection=False,
    )


def text_config(full: bool) -> dict:
    return layouts.text_config(full)


def vae_config(full: bool) -> dict:
    cfg = layouts.vae_config(full)
    if not full:
        # the SD VAE's two resnets per block (the kiosk's tiny VAE has one), tiny widths
        cfg.update(block_out_channels=TINY_VAE_BLOCK_OUT_CHANNELS, layers_per_block=2, norm_num_groups=TINY_NORM_GROUPS)
    return cfg


def build(full: bool, seed: int, device: str | None = None):
    """Random-weight (text_encoder, unet, vae), seeded, float32, eval mode. `device="meta"` builds
    the modules without allocating weights (for parameter counts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ctx = torch.device(device) if device else torch.device("cpu")
    with ctx:
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(**text_config(full), attn_implementation="eager"))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**unet_config(full))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**vae_config(full))
    if not full and device != "meta":
        with torch.no_grad():
            unet.conv_out.weight.mul_(UNET_OUT_GAIN)
            unet.conv_out.bias.mul_(UNET_OUT_GAIN)
    return te.eval().float(), unet.eval().float(), vae.eval().float()


def save_pipeline(te, unet, vae, out, tokenizer_dir=None, tokenizer_symlink=None) -> None:
    """Save a diffusers StableDiffusionPipeline folder (safetensors, float32) at `out`, with SD 1.5's
    scheduler config as shipped (layouts.SD15_SCHEDULER_CONFIG, written verbatim). The tokenizer is
    either copied from `tokenizer_dir` or replaced by a relative symlink `tokenizer -> tokenizer_symlink`."""
    import json
    import shutil
    from pathlib import Path

    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else (out / tokenizer_symlink).resolve()
    tok = CLIPTokenizer.from_pretrained(str(tok_src))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(layouts.SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(layouts.SD15_SCHEDULER_CONFIG, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out / "tokenizer")
    if tokenizer_symlink:
        (out / "tokenizer").symlink_to(tokenizer_symlink)
    else:
        shutil.copytree(tok_src, out / "tokenizer")
    for f in out.rglob("*"):  # savers write some files 0600
        if f.is_file() and not f.is_symlink() and "tokenizer" not in f.relative_to(out).parts:
            f.chmod(0o644)
