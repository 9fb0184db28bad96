#!/usr/bin/env python3
"""Writes diffusion/tests/fixtures/schedulers.json: diffusers' scheduler numbers for the Rust tests.

Pinned: diffusers 0.42.1, torch 2.15, numpy 2.4 (CPU). Run from anywhere:

    python diffusion/reference/make_reference.py   (the venv of onnx/requirements.txt)

Each trajectory runs one diffusers scheduler the way StableDiffusionPipeline (text-to-image) and
StableDiffusionImg2ImgPipeline (img2img) drive it, on a [1, 4, 4, 4] latent, with a deterministic
synthetic "model" that the Rust test implements identically (`synthetic_model` below: f32
multiplies and adds only, so both sides compute it bit for bit from the same input). The noise comes
from noise.py (the generator of docs/protocol.md section 8): stream 0 for text-to-image, stream 1
for img2img re-noising, streams 1000 + k for LCM's per-step noise, which is injected into diffusers
by replacing the `randn_tensor` that LCMScheduler.step calls.
"""

import json
import pathlib
import sys

import numpy as np
import torch
import diffusers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers import scheduling_lcm

HERE = pathlib.Path(__file__).resolve().parent
sys.dont_write_bytecode = True
sys.path.insert(0, str(HERE))
from noise import gaussian_noise  # noqa: E402

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as shipped.
SD15_CONFIG = {
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
}

KINDS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
N = 64
SEED = 42
CLEAN = np.array([((i % 11) - 5) * 0.1 for i in range(N)], dtype=np.float32)


def synthetic_model(x, t):
    """eps (or v) = x * (0.8 - 0.02 x^2) + c_i * (t / 1000), c_i = ((i mod 7) - 3) * 0.1, all f32."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    c = ((np.arange(N) % 7).astype(np.float32) - np.float32(3)) * np.float32(0.1)
    tt = np.float32(t) / np.float32(1000)
    return x * (np.float32(0.8) - np.float32(0.02) * x * x) + c * tt


def f32_list(t):
    """f32 values as the shortest decimals that round-trip through f32 (keeps the fixture small)."""
    return [float(str(v)) for v in np.asarray(t, dtype=np.float32).reshape(-1)]


def make(kind, config):
    return KINDS[kind].from_config(config)


def trajectory(kind, prediction, steps, strength_bp, config_extra=None):
    config = dict(SD15_CONFIG, prediction_type=prediction, **(config_extra or {}))
    s = make(kind, config)
    s.set_timesteps(steps)
    case = {
        "kind": kind,
        "prediction_type": prediction,
        "config_extra": config_extra or {},
        "steps": steps,
        "strength_bp": strength_bp,
    }
    if strength_bp == 10000:
        noise = torch.tensor(gaussian_noise(SEED, 0, N), dtype=torch.float32).reshape(1, 4, 4, 4)
        latents = noise * s.init_noise_sigma
        timesteps = s.timesteps
    else:
        n = steps * strength_bp // 10000
        t_start = steps - n
        timesteps = s.timesteps[t_start * s.order :]
        if hasattr(s, "set_begin_index"):  # DDIM has none: its step works from `t` alone
            s.set_begin_index(t_start * s.order)
        noise = torch.tensor(gaussian_noise(SEED, 1, N), dtype=torch.float32).reshape(1, 4, 4, 4)
        latents = s.add_noise(torch.from_numpy(CLEAN).reshape(1, 4, 4, 4), noise, timesteps[:1])
    case["init_noise_sigma"] = float(s.init_noise_sigma)
    case["timesteps"] = [float(t) for t in timesteps]
    case["start"] = f32_list(latents)
    samples, x0s, step_noise = [], [], []
    for i, t in enumerate(timesteps):
        model_input = s.scale_model_input(latents, t)
        out = torch.from_numpy(synthetic_model(model_input.numpy(), t.float().item())).reshape(1, 4, 4, 4)
        if kind == "lcm":
            fresh = torch.tensor(gaussian_noise(SEED, 1000 + i, N), dtype=torch.float32).reshape(1, 4, 4, 4)
            scheduling_lcm.randn_tensor = lambda *a, _f=fresh, **k: _f
            if i + 1 < len(timesteps):
                step_noise.append(f32_list(fresh))
        result = s.step(out, t, latents)
        latents = result.prev_sample
        if kind == "dpmpp2m":
            x0 = s.model_outputs[-1]
        elif kind == "lcm":
            x0 = result.denoised
        else:
            x0 = result.pred_original_sample
        samples.append(f32_list(latents))
        x0s.append(f32_list(x0))
    case["samples"] = samples
    case["x0"] = x0s
    if step_noise:
        case["step_noise"] = step_noise
    return case


def timestep_tables():
    """timesteps (and Euler's init_noise_sigma) for every kind, spacing and a range of step counts."""
    tables = []
    for kind in KINDS:
        for spacing in ["leading", "trailing", "linspace"]:
            for steps in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 50]:
                s = make(kind, dict(SD15_CONFIG, timestep_spacing=spacing))
                s.set_timesteps(steps)
                row = {"kind": kind, "spacing": spacing, "steps": steps, "timesteps": [float(t) for t in s.timesteps]}
                if kind == "euler":
                    row["init_noise_sigma"] = float(s.init_noise_sigma)
                    row["sigmas"] = f32_list(s.sigmas)
                tables.append(row)
    return tables


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    cases = []
    for kind in KINDS:
        for prediction in ["epsilon", "v_prediction"]:
            cases.append(trajectory(kind, prediction, 4, 10000))
            cases.append(trajectory(kind, prediction, 6, 5000))
            if kind in ("euler", "dpmpp2m"):
                cases.append(trajectory(kind, prediction, 10, 10000))
    # Spacings other than each class's default, Euler's leading init_noise_sigma, clip_sample.
    cases.append(trajectory("ddim", "epsilon", 4, 10000, {"timestep_spacing": "trailing"}))
    cases.append(trajectory("euler", "epsilon", 4, 10000, {"timestep_spacing": "leading"}))
    cases.append(trajectory("euler", "v_prediction", 5, 10000, {"timestep_spacing": "trailing"}))
    cases.append(trajectory("dpmpp2m", "epsilon", 5, 7000, {"timestep_spacing": "leading"}))
    cases.append(trajectory("ddim", "epsilon", 4, 10000, {"clip_sample": True}))
    cases.append(trajectory("lcm", "v_prediction", 4, 10000, {"clip_sample": True}))
    # alphas_cumprod as f32 bits, for the SD 1.x schedule and the classes' default linear one.
    alphas_cumprod_bits = {
        name: [int(b) for b in make("ddim", cfg).alphas_cumprod.numpy().view(np.uint32)]
        for name, cfg in [("scaled_linear_sd", SD15_CONFIG), ("linear_default", {})]
    }
    fixture = {
        "generator": "diffusion/reference/make_reference.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "seed": SEED,
        "scheduler_config": SD15_CONFIG,
        "clean": f32_list(CLEAN),
        "alphas_cumprod_bits": alphas_cumprod_bits,
        "cases": cases,
        "timestep_tables": timestep_tables(),
    }
    path = HERE.parent / "tests" / "fixtures" / "schedulers.json"
    path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(cases)} trajectories)")


if __name__ == "__main__":
    main()
