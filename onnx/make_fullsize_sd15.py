"""Full-size RANDOM-WEIGHT Stable Diffusion v1.5 diffusers folder for gateway benchmarks (never
committed, never used for pictures).

    python onnx/make_fullsize_sd15.py [--out models/sd15-full] [--seed 0] [--count-only]
        [--tokenizer DIR] [--threads N]

Layout (layouts_sd15.py): the runwayml SD v1.5 UNet (block_out_channels 320/640/1280/1280,
layers_per_block 2, 8 heads, cross_attention_dim 768, UNetMidBlock2DCrossAttn; 859,520,964
parameters), the CLIP ViT-L/14 text encoder config, the SD VAE config, SD 1.5's scheduler config,
and the real CLIP tokenizer built offline by make_tokenizer.py. Saved by diffusers as safetensors,
float32 (~4.3 GB). `--count-only` builds the modules on the meta device and prints the parameter
counts without allocating or writing anything. `--tokenizer DIR` copies an already built and
verified tokenizer folder (e.g. the one of a folder made here) instead of building one, for
machines without open_clip (a lent GPU machine); `--threads` sets torch's CPU threads for the
random initialisation (default 1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import layouts_sd15  # noqa: E402
import make_tiny_sd15  # noqa: E402
import make_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "sd15-full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count-only", action="store_true", help="build on the meta device, print parameter counts, write nothing")
    ap.add_argument("--tokenizer", type=Path, help="copy this tokenizer folder instead of building one")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the initialisation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    te, unet, vae = layouts_sd15.build(full=True, seed=args.seed, device="meta" if args.count_only else None)
    n = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n:,} (runwayml SD v1.5: {layouts_sd15.SD15_UNET_PARAMS:,})")
    print(f"text encoder parameters: {sum(p.numel() for p in te.parameters()):,}; VAE: {sum(p.numel() for p in vae.parameters()):,}")
    if n != layouts_sd15.SD15_UNET_PARAMS:
        raise SystemExit("UNet layout does not match SD v1.5")
    if args.count_only:
        return
    if args.out.exists():
        shutil.rmtree(args.out)
    if args.tokenizer:
        layouts_sd15.save_pipeline(te, unet, vae, args.out, tokenizer_dir=args.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tok = Path(tmp) / "tokenizer"
            make_tokenizer.write_tokenizer(tok, minimal=False)
            layouts_sd15.save_pipeline(te, unet, vae, args.out, tokenizer_dir=tok)
        make_tokenizer.verify(args.out / "tokenizer")
    print(f"text encoder key prefix(es): {make_tiny_sd15.check_folder(args.out)}; every tensor float32")
    for p in sorted(args.out.rglob("*.safetensors")):
        print(f"{p.relative_to(args.out)}: {p.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
