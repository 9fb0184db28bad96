"""diffusers side of `bench-gateway`: time one UNet call (or, with --part vae, one VAE decode) of
a diffusers SD 1.x folder, printed as one JSON line. Same shapes as the candle side: `rows` batch
rows of `latent`x`latent` latents, 77-token text states, one timestep per row, f32, all CPU
threads (or CUDA in f16 with --device cuda).

    python tools/bench/diffusers_bench.py --model DIR --latent 64 --rows 2 --repeat 2
    python tools/bench/diffusers_bench.py --model DIR --latent 64 --rows 1 --part vae
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default (all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--part", choices=["unet", "vae"], default="unet")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 4, args.latent, args.latent, generator=g).to(args.device, dtype)
    if args.part == "vae":
        vae = AutoencoderKL.from_pretrained(f"{args.model}/vae", torch_dtype=dtype)
        vae = vae.to(args.device).eval()

        def call():
            vae.decode(x / vae.config.scaling_factor).sample
    else:
        unet = UNet2DConditionModel.from_pretrained(f"{args.model}/unet", torch_dtype=dtype)
        unet = unet.to(args.device).eval()
        ctx = torch.randn(args.rows, 77, unet.config.cross_attention_dim, generator=g)
        ctx = ctx.to(args.device, dtype)
        t = torch.linspace(900, 100, args.rows).to(args.device)

        def call():
            unet(x, t, encoder_hidden_states=ctx).sample

    def run():
        with torch.inference_mode():
            call()
        if args.device == "cuda":
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(max(args.repeat, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
