"""onnxruntime side of `bench-edge`: one measurement per process, printed as one JSON line.

Same graphs, same inputs, same thread count as the tract side (intra-op threads = --threads,
sequential execution). Run by `bench-edge`; usable alone:
    python tools/bench/ort_bench.py --spec unet-64x64-b1:f32 --model DIR --threads 2
"""
import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

SD15 = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(repeat: int, run) -> tuple[float, float]:
    run()
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def timestep_input(sess, batch: int, value: float):
    shape = sess.get_inputs()[[i.name for i in sess.get_inputs()].index("timestep")].shape
    return np.array(value, dtype=np.float32) if len(shape) == 0 else np.full((batch,), value, np.float32)


def ids_input(sess):
    dtype = np.int32 if "int32" in sess.get_inputs()[0].type else np.int64
    ids = np.full((1, 77), 49407, dtype=dtype)
    ids[0, 0] = 49406
    return ids


def ddim_preview(model: Path, threads: int, guidance: float, tiny: bool):
    """Text encoder + 4 DDIM steps + VAE (or tiny VAE) decode at 256 px, as the tract pipeline does."""
    te = session(model / "text_encoder/model.onnx", threads)
    unet = session(model / "unet/model.onnx", threads)
    vae = session(model / ("tiny_vae_decoder" if tiny else "vae_decoder") / "model.onnx", threads)
    # The tiny decoder takes the UNet's latents as they are; the VAE takes latents / 0.18215.
    scale = 1.0 if tiny else 0.18215
    betas = np.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000, dtype=np.float32) ** 2
    abar = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
    steps = [751, 501, 251, 1]
    rng = np.random.default_rng(1)

    def run():
        cond = te.run(["last_hidden_state"], {"input_ids": ids_input(te)})[0]
        embeds = np.concatenate([cond, cond]) if guidance > 1 else cond
        batch = embeds.shape[0]
        x = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
        for i, t in enumerate(steps):
            inp = np.concatenate([x] * batch)
            eps = unet.run(None, {"sample": inp, "timestep": timestep_input(unet, batch, float(t)),
                                  "encoder_hidden_states": embeds})[0]
            if guidance > 1:
                eps = eps[:1] + guidance * (eps[1:] - eps[:1])
            a_t = abar[t]
            a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else abar[0]
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        vae.run(None, {"latent_sample": x / scale})

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    name, _precision = args.spec.split(":")
    if name.startswith("unet-"):
        size, batch = name[len("unet-"):].split("-b")
        side, batch = int(size.split("x")[0]), int(batch)
        sess = session(args.model / "unet/model.onnx", args.threads)
        feeds = {"sample": np.full((batch, 4, side, side), 0.5, np.float32),
                 "timestep": timestep_input(sess, batch, 501.0),
                 "encoder_hidden_states": np.full((batch, 77, 768), 0.1, np.float32)}
        run = lambda: sess.run(None, feeds)  # noqa: E731
    elif name == "text-encoder":
        sess = session(args.model / "text_encoder/model.onnx", args.threads)
        feeds = {"input_ids": ids_input(sess)}
        run = lambda: sess.run(["last_hidden_state"], feeds)  # noqa: E731
    elif name.startswith("vae-decode-"):
        side = int(name[len("vae-decode-"):]) // 8
        sess = session(args.model / "vae_decoder/model.onnx", args.threads)
        feeds = {"latent_sample": np.full((1, 4, side, side), 0.3, np.float32)}
        run = lambda: sess.run(None, feeds)  # noqa: E731
    elif name.startswith("tiny-decode-"):
        side = int(name[len("tiny-decode-"):]) // 8
        sess = session(args.model / "tiny_vae_decoder/model.onnx", args.threads)
        feeds = {"latent_sample": np.full((1, 4, side, side), 0.3, np.float32)}
        run = lambda: sess.run(None, feeds)  # noqa: E731
    elif name.startswith("preview-256-4steps-"):
        tiny = name.endswith("-tiny")
        guided = name.removesuffix("-tiny").endswith("-cfg")
        run = ddim_preview(args.model, args.threads, 7.5 if guided else 1.0, tiny)
    else:
        raise SystemExit(f"unknown measurement {name}")
    median, fastest = timed(args.repeat, run)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"median_s": median, "min_s": fastest, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
