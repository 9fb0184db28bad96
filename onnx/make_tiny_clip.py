"""Regenerate the CLIP score fixture: a tiny random-weight transformers `CLIPModel` folder and
transformers' outputs for it.

    python onnx/make_tiny_clip.py [--fixtures DIR]

1. `tiny-clip/`: `CLIPModel.save_pretrained(..., safe_serialization=True)` of a tiny RANDOM-WEIGHT
   CLIP (text: hidden 4, 2 layers, 2 heads, the real 49408-token vocabulary and 77 positions;
   vision: hidden 32, 2 layers, 4 heads, image 32, patch 8; projection 16; quick_gelu; seed 0),
   the layout of `openai/clip-vit-*` folders: `config.json`, `model.safetensors`,
   `preprocessor_config.json` (CLIPImageProcessor's defaults at image size 32), and the tokenizer
   files as relative symlinks to `../tiny-sd/tokenizer/` (the real CLIP ViT-L/14 tokenizer, made
   offline by make_tokenizer.py). Every weight is rounded to float16 and the folder is saved in
   float16 (the token embedding alone is 49408 x 4 values), so the file stays small; the
   references below come from the float32 model holding exactly those values.
2. `tiny-clip-reference/`, from the float32 model (CPU):
   - `image_{name}.npy`: deterministic test images, float32 [3, H, W] in [0, 1] (our decoded
     images' form): `a` 40x48 (downscaled, cropped), `b` 32x32 (as is), `c` 20x28 (upscaled,
     cropped);
   - `pixel_values_{name}.npy`: CLIPImageProcessor (transformers 5's default, torchvision backend)
     on the float image with `do_rescale=False` (it is already in [0, 1]): [1, 3, 32, 32];
   - `pixel_values_u8_{name}.npy`: the same processor on the image rounded to uint8 HWC, with its
     default rescale (what it gives for a PNG of the image), to measure what 8-bit rounding moves;
   - `image_embeds.npy` [images, 16]: `get_image_features(pixel_values_{name})` (projected, not
     normalized), in the order of `reference.json`'s images;
   - `text_embeds.npy` [prompts, 16]: `get_text_features` of the prompts' ids (77, padded with
     <|endoftext|> like diffusers; the last prompt is longer than 77 tokens and is truncated);
   - `reference.json`: prompts and their ids, image names and shapes, `cosine[image][prompt]`
     and `clip_score[image][prompt] = 100 * max(0, cosine)` (torchmetrics' CLIPScore), and the
     max abs difference between the float and uint8 pixel values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEED = 0
IMAGE_SIZE = 32
TOKENIZER_LINK = "../tiny-sd/tokenizer"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
PROMPTS = [
    "a red fox in the snow, watercolor",
    "an astronaut riding a horse",
    "",
    " ".join(["a very long prompt about a fox"] * 20),  # > 77 tokens: truncated, no padding
]
IMAGES = {"a": (40, 48), "b": (32, 32), "c": (20, 28)}


def config():
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=4,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=16,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=16,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def image(name: str, height: int, width: int) -> np.ndarray:
    """A smooth deterministic pattern per channel, float32 [3, H, W] in [0, 1], with an edge so
    the resampling filter's overshoot shows."""
    y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    k = ord(name) - ord("a") + 1
    r = 0.5 + 0.5 * np.sin(0.31 * k * x + 0.17 * y)
    g = 0.5 + 0.5 * np.cos(0.23 * x - 0.41 * k * y)
    b = ((x + 2 * y) % 11 < 5).astype(np.float64) * 0.8 + 0.1
    return np.stack([r, g, b]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=HERE / "fixtures")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model_dir = args.fixtures / "tiny-clip"
    ref_dir = args.fixtures / "tiny-clip-reference"
    for d in (model_dir, ref_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    torch.manual_seed(SEED)
    model = CLIPModel(config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.half().save_pretrained(str(model_dir), safe_serialization=True)
    (model_dir / "model.safetensors").chmod(0o644)  # save_pretrained writes it 0600
    model.float()
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(str(model_dir))
    for name in TOKENIZER_FILES:
        (model_dir / name).symlink_to(f"{TOKENIZER_LINK}/{name}")

    # The saved folder reads back to the same model (keys, dtype).
    loaded = CLIPModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys), keys
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir))

    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text_embeds = model.get_text_features(input_ids=ids).pooler_output
    pixels, pixels_u8, u8_diff = [], [], {}
    for name, (h, w) in IMAGES.items():
        img = image(name, h, w)
        np.save(ref_dir / f"image_{name}.npy", img)
        pv = processor(images=img, do_rescale=False, input_data_format="channels_first", return_tensors="pt").pixel_values
        assert pv.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE), pv.shape
        u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        pv8 = processor(images=u8, input_data_format="channels_last", return_tensors="pt").pixel_values
        np.save(ref_dir / f"pixel_values_{name}.npy", pv.numpy().astype(np.float32))
        np.save(ref_dir / f"pixel_values_u8_{name}.npy", pv8.numpy().astype(np.float32))
        u8_diff[name] = float((pv - pv8).abs().max())
        pixels.append(pv)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=torch.cat(pixels)).pooler_output
    np.save(ref_dir / "text_embeds.npy", text_embeds.numpy().astype(np.float32))
    np.save(ref_dir / "image_embeds.npy", image_embeds.numpy().astype(np.float32))
    ti = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    ii = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    cosine = (ii @ ti.T).double()
    score = 100.0 * cosine.clamp(min=0)
    reference = {
        "source": "transformers CLIPModel (float32, CPU) and CLIPImageProcessor (torchvision backend)",
        "transformers": __import__("transformers").__version__,
        "prompts": PROMPTS,
        "ids": ids.tolist(),
        "images": [{"name": n, "height": h, "width": w} for n, (h, w) in IMAGES.items()],
        "cosine": cosine.tolist(),
        "clip_score": score.tolist(),
        "pixel_values_u8_max_abs_diff": u8_diff,
    }
    (ref_dir / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"keys: {len(keys)}, e.g. {keys[:3]}")
    print(f"cosine:\n{cosine.numpy().round(4)}")
    print(f"uint8 vs float pixel values, max abs diff: {u8_diff}")
    total = sum(p.stat().st_size for d in (model_dir, ref_dir) for p in d.iterdir() if not p.is_symlink())
    print(f"fixture size (without the tokenizer symlinks): {total} bytes")


if __name__ == "__main__":
    main()
