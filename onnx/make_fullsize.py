"""Full-size RANDOM-WEIGHT Tiny-SD graphs for benchmarks (never committed, never used for pictures).

    python onnx/make_fullsize.py [--out models/tiny-sd-full] [--verify]

Writes `OUT/f32/` (export.py layout + manifest) and `OUT/int8/` (quantize.py's default, weight-only
int8; for the dynamic form beside it: `python onnx/quantize.py --mode dynamic --model OUT/f32 --out
OUT/int8-dynamic`, and `bench-edge --int8 OUT/int8-dynamic`), both with the optional
`tiny_vae_decoder/` (TAESD's layout: diffusers' `AutoencoderTiny` defaults, 64 channels);
`--add-tiny-decoder` adds only that to existing folders. Layout: segmind/tiny-sd
(BK-SDM-Tiny) UNet (block_out_channels 320/640/1280, 3 cross-attention stages, no mid block, one
layer per down stage, 8 heads, cross_attention_dim 768; 323,384,964 parameters), the CLIP ViT-L/14
text encoder config, the SD VAE config. Timings are what these graphs are for, so verification is
off unless --verify (slow on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export  # noqa: E402
import layouts  # noqa: E402
import quantize  # noqa: E402

EXPECTED_UNET_PARAMS = 323_384_964


def add_tiny_decoder(folder: Path, args) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(args.seed)
    tiny = AutoencoderTiny().eval()
    print(f"tiny VAE decoder parameters: {sum(p.numel() for p in tiny.decoder.parameters()):,}")
    export.add_tiny_vae_decoder(tiny, folder, opset=args.opset, verify_graph=args.verify,
                                source=f"random weights: onnx/make_fullsize.py (AutoencoderTiny defaults, seed {args.seed}); benchmarks only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "tiny-sd-full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--verify", action="store_true", help="check graphs against PyTorch at 256x256 (slow)")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--add-tiny-decoder", action="store_true", help="only add tiny_vae_decoder/ to existing OUT/f32, OUT/int8")
    args = ap.parse_args()
    if args.add_tiny_decoder:
        for folder in (args.out / "f32", args.out / "int8"):
            if (folder / export.MANIFEST).is_file():
                add_tiny_decoder(folder, args)
        return
    te, unet, vae = layouts.build(full=True, seed=args.seed)
    n = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n:,} (segmind/tiny-sd: {EXPECTED_UNET_PARAMS:,})")
    if n != EXPECTED_UNET_PARAMS:
        raise SystemExit("UNet layout does not match Tiny-SD")
    print(f"text encoder parameters: {sum(p.numel() for p in te.parameters()):,}; VAE: {sum(p.numel() for p in vae.parameters()):,}")
    f32 = args.out / "f32"
    export.export_pipeline(te, unet, vae, layouts.SD15_SCHEDULER_CONFIG, f32, opset=args.opset,
                           source=f"random weights: onnx/make_fullsize.py (Tiny-SD layout, seed {args.seed}); benchmarks only",
                           source_dir=None, resolutions=[(256, 256)], verify_graphs=args.verify,
                           skip_vae_encoder_above=0)
    add_tiny_decoder(f32, args)
    if not args.skip_int8:
        quantize.quantize_folder(f32, args.out / "int8")
    for p in sorted(args.out.rglob("*.onnx")):
        print(f"{p.relative_to(args.out)}: {p.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
