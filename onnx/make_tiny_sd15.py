"""Regenerate the gateway's committed fixtures: a tiny SD v1.5-layout diffusers folder and diffusers'
img2img references for it.

    python onnx/make_tiny_sd15.py [--fixtures DIR]

1. `tiny-sd15/`: a tiny RANDOM-WEIGHT pipeline with the real SD v1.5 layout (see layouts_sd15.py),
   saved by diffusers as a safetensors folder (float32), the layout the gateway loads with candle.
   `tokenizer` is a relative symlink to `../tiny-sd/tokenizer` (the same CLIP tokenizer).
2. `tiny-sd15-reference/`: diffusers' StableDiffusionImg2ImgPipeline run on those weights (float32,
   CPU) from a fixed latent, as the gateway refines a kiosk's preview: re-noise to the noise level,
   denoise the remaining steps. Every random draw is replaced by the portable seeded generator of
   docs/protocol.md section 8 (diffusion/reference/noise.py), so the Rust side reproduces each case
   from its seeds alone:
   - the initial latent: gaussian_noise(7, stream 0) * 0.8 (f32 multiply), as [1, 4, 32, 32];
   - the re-noising noise: gaussian_noise(42, stream 1) (STREAM_RENOISE), injected where
     `prepare_latents` draws it (`randn_tensor` in pipeline_stable_diffusion_img2img);
   - LCM's per-step noise: gaussian_noise(42, stream 1000 + k) for step k of the run (0-based,
     counted in the steps run), injected where `LCMScheduler.step` draws it (`randn_tensor` in
     scheduling_lcm). No other scheduler draws: any other draw is an error.
   .npy files are float32 unless noted, little-endian, C order; `cases.json` indexes them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "diffusion" / "reference"))
import layouts  # noqa: E402
import layouts_sd15  # noqa: E402
import noise as portable_noise  # noqa: E402

SEED = 0  # model weights: torch.manual_seed(SEED) text encoder, SEED + 1 UNet, SEED + 2 VAE
PROMPT = "a red fox in the snow, watercolor"
NEGATIVE = "blurry"
NOISE_SEED = 42  # RefineRequest.seed
STREAM_INIT = 0
STREAM_RENOISE = 1
STREAM_LCM_STEP = 1000
INIT_LATENT_SEED = 7
INIT_LATENT_SCALE = 0.8
HEIGHT = WIDTH = 256
LATENT_SHAPE = (1, 4, HEIGHT // 8, WIDTH // 8)
GUIDANCE = 7.5
IMAGE_CASES = {"ddim_s50_n10"}  # a decoded image is 768 KB: keep one
TOKENIZER_LINK = "../tiny-sd/tokenizer"
PROTOCOL_SCHEDULER = {"ddim": 1, "euler": 2, "dpmpp2m": 3, "lcm": 4}  # RefineRequest.scheduler


def schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    cfg = layouts.SD15_SCHEDULER_CONFIG
    return {
        "ddim": lambda: DDIMScheduler.from_config(cfg),
        "euler": lambda: EulerDiscreteScheduler.from_config(cfg),
        "dpmpp2m": lambda: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
        "lcm": lambda: LCMScheduler.from_config(cfg),
    }


def case_list() -> list[dict]:
    """name, scheduler, steps N, noise level in basis points (strength = bp / 10000), guidance."""
    cases = []
    for name in ("ddim", "euler", "dpmpp2m", "lcm"):
        cases.append(dict(scheduler=name, steps=10, noise_level_bp=5000, guidance=1.0 if name == "lcm" else GUIDANCE))
    cases.append(dict(scheduler="ddim", steps=20, noise_level_bp=3000, guidance=GUIDANCE))
    cases.append(dict(scheduler="ddim", steps=4, noise_level_bp=10000, guidance=GUIDANCE))
    for c in cases:
        c["name"] = f"{c['scheduler']}_s{c['noise_level_bp'] // 100}_n{c['steps']}"
        c["strength"] = c["noise_level_bp"] / 10000
        # diffusers' int(N * strength) must equal the protocol's integer floor(N * bp / 10000)
        assert int(c["steps"] * c["strength"]) == c["steps"] * c["noise_level_bp"] // 10000, c
    return cases


def gaussian(seed: int, stream: int, shape=LATENT_SHAPE) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.array(portable_noise.gaussian_noise(seed, stream, n), dtype=np.float32).reshape(shape))


def init_latent() -> torch.Tensor:
    return gaussian(INIT_LATENT_SEED, STREAM_INIT) * np.float32(INIT_LATENT_SCALE)


class PortableNoise:
    """Replaces diffusers' `randn_tensor` where img2img and the schedulers import it: the pipeline's
    one draw (the re-noising noise) becomes stream 1, LCM's step k draw stream 1000 + k; any other
    draw raises."""

    PIPELINE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
    SCHEDULERS = [
        "diffusers.schedulers.scheduling_ddim",
        "diffusers.schedulers.scheduling_euler_discrete",
        "diffusers.schedulers.scheduling_dpmsolver_multistep",
        "diffusers.schedulers.scheduling_lcm",
    ]

    def __init__(self, seed: int):
        self.seed = seed
        self.renoise: torch.Tensor | None = None
        self.step_noise: list[torch.Tensor] = []
        self._orig = {}

    def _pipeline_draw(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.renoise is None, "img2img drew noise twice"
        assert tuple(shape) == LATENT_SHAPE, shape
        self.renoise = gaussian(self.seed, STREAM_RENOISE).to(dtype=dtype)
        return self.renoise.clone()

    def _lcm_draw(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == LATENT_SHAPE, shape
        t = gaussian(self.seed, STREAM_LCM_STEP + len(self.step_noise)).to(dtype=dtype)
        self.step_noise.append(t)
        return t.clone()

    @staticmethod
    def _forbidden(*args, **kwargs):
        raise AssertionError("unexpected scheduler noise draw")

    def __enter__(self):
        for modname in [self.PIPELINE] + self.SCHEDULERS:
            mod = importlib.import_module(modname)
            assert hasattr(mod, "randn_tensor"), modname
            self._orig[modname] = mod.randn_tensor
            if modname == self.PIPELINE:
                mod.randn_tensor = self._pipeline_draw
            elif modname.endswith("scheduling_lcm"):
                mod.randn_tensor = self._lcm_draw
            else:
                mod.randn_tensor = self._forbidden
        return self

    def __exit__(self, *exc):
        for modname, orig in self._orig.items():
            importlib.import_module(modname).randn_tensor = orig


def save(path: Path, array) -> None:
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))))


def jsonable(v):
    """Config values as strict JSON: tuples -> lists, numpy scalars -> Python, non-finite -> null."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def tokenize(tok, texts):
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids.astype(np.int64)


def expected_noisy(sched, x0: torch.Tensor, noise: torch.Tensor, begin: int, t: float) -> torch.Tensor:
    """docs/protocol.md 8.5's re-noising, per scheduler, in float64 from the scheduler's tables."""
    x0, noise = x0.double(), noise.double()
    if hasattr(sched, "sigmas") and type(sched).__name__ == "EulerDiscreteScheduler":
        sigma = float(sched.sigmas[begin])
        return x0 + sigma * noise
    if type(sched).__name__ == "DPMSolverMultistepScheduler":
        sigma = float(sched.sigmas[begin])
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return alpha * x0 + (sigma * alpha) * noise
    abar = float(sched.alphas_cumprod[int(t)])
    return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise


def run_case(case: dict, pipe, out: Path) -> dict:
    sched = schedulers()[case["scheduler"]]()
    pipe.scheduler = sched
    d = out / case["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    embeds: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: embeds.append(kw["encoder_hidden_states"].clone()) if not embeds else None, with_kwargs=True)
    noisy: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig_add_noise = sched.add_noise

    def add_noise(original, noise, timesteps):
        result = orig_add_noise(original, noise, timesteps)
        noisy.append((result.clone(), timesteps.clone()))
        return result

    sched.add_noise = add_noise
    steps: list[torch.Tensor] = []
    timesteps: list[float] = []

    def on_step(p, i, t, kw):
        steps.append(kw["latents"].clone())
        timesteps.append(float(t))
        return kw

    x0 = init_latent()
    with PortableNoise(NOISE_SEED) as rng, torch.no_grad():
        final = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=x0.clone(), strength=case["strength"],
                     num_inference_steps=case["steps"], guidance_scale=case["guidance"], output_type="latent",
                     callback_on_step_end=on_step).images
    hook.remove()
    del sched.add_noise

    cfg = case["guidance"] > 1.0
    n_run = case["steps"] * case["noise_level_bp"] // 10000
    assert len(steps) == n_run, (len(steps), n_run)
    assert len(noisy) == 1 and rng.renoise is not None
    begin = case["steps"] - n_run  # sched.order == 1 for all four
    assert sched.order == 1 and float(noisy[0][1][0]) == timesteps[0]
    # the 8.5 formulas against diffusers' add_noise
    renoise_diff = float((expected_noisy(sched, x0, rng.renoise, begin, timesteps[0]) - noisy[0][0].double()).abs().max())
    assert renoise_diff < 1e-5, renoise_diff
    n_lcm = n_run - 1 if case["scheduler"] == "lcm" else 0  # the schedule's last step draws none
    assert len(rng.step_noise) == n_lcm, len(rng.step_noise)

    files = []

    def put(name, value):
        save(d / name, value)
        files.append(name)

    put("init_latent.npy", x0)
    put("noise.npy", rng.renoise)
    put("noisy_latent.npy", noisy[0][0])
    put("prompt_ids.npy", tokenize(pipe.tokenizer, [NEGATIVE, PROMPT] if cfg else [PROMPT]))
    put("prompt_embeds.npy", embeds[0])
    for k, t in enumerate(rng.step_noise):
        put(f"step_noise{k}.npy", t)
    put("timesteps.npy", np.array(timesteps, dtype=np.float32))
    for k, lat in enumerate(steps):
        put(f"latents_step{k}.npy", lat)
    put("final_latent.npy", final)
    assert torch.equal(final, steps[-1])
    if case["name"] in IMAGE_CASES:
        with torch.no_grad():
            img = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
        put("image.npy", (img / 2 + 0.5).clamp(0, 1))
    info = dict(
        scheduler=type(sched).__name__,
        protocol_scheduler=PROTOCOL_SCHEDULER[case["scheduler"]],
        # `_use_default_values` is diffusers' bookkeeping, in set order (varies run to run): left out
        scheduler_config=jsonable({k: v for k, v in dict(sched.config).items() if k != "_use_default_values"}),
        steps=case["steps"],
        strength=case["strength"],
        noise_level_bp=case["noise_level_bp"],
        steps_run=len(steps),
        skipped_steps=begin,
        guidance_scale=case["guidance"],
        classifier_free_guidance=cfg,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=NOISE_SEED,
        renoise_stream=STREAM_RENOISE,
        step_noise_streams=[STREAM_LCM_STEP + k for k in range(n_lcm)],
        init_latent=f"gaussian_noise({INIT_LATENT_SEED}, stream {STREAM_INIT}) * float32({INIT_LATENT_SCALE})",
        height=HEIGHT,
        width=WIDTH,
        timesteps=timesteps,
        renoise_timestep=float(noisy[0][1][0]),
        renoise_formula_max_abs_diff=float(f"{renoise_diff:.3e}"),
        files=sorted(files),
    )
    if hasattr(sched, "sigmas"):
        info["sigmas"] = [float(s) for s in sched.sigmas]
    return info


def check_folder(folder: Path) -> str:
    """Every safetensors tensor is float32; returns the text encoder's key prefix."""
    from safetensors import safe_open

    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dtypes == {"F32"}, (f, dtypes)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as st:
        keys = list(st.keys())
    prefixes = {k.split(".", 1)[0] for k in keys}
    return ", ".join(sorted(prefixes))


def write_model(folder: Path):
    te, unet, vae = layouts_sd15.build(full=False, seed=SEED)
    layouts_sd15.save_pipeline(te, unet, vae, folder, tokenizer_symlink=TOKENIZER_LINK)
    return te, unet, vae


def generate(fixtures: Path) -> None:
    """Write `fixtures/tiny-sd15/` and `fixtures/tiny-sd15-reference/` (needs `fixtures/tiny-sd/tokenizer`)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    # One thread: the references were written that way, and torch's reductions round differently
    # with more threads (1e-5 on these latents), which would change the committed bytes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _generate(fixtures, StableDiffusionImg2ImgPipeline)
    finally:
        torch.set_num_threads(threads)


def _generate(fixtures: Path, StableDiffusionImg2ImgPipeline) -> None:
    model_dir = fixtures / "tiny-sd15"
    ref_dir = fixtures / "tiny-sd15-reference"
    if not (fixtures / "tiny-sd" / "tokenizer" / "tokenizer.json").is_file():
        raise SystemExit(f"{fixtures / 'tiny-sd' / 'tokenizer'} missing: run onnx/make_tiny.py first")
    for p in (model_dir, ref_dir):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    te, unet, vae = write_model(model_dir)
    prefix = check_folder(model_dir)
    # The references run on the folder as diffusers loads it (symlinked tokenizer included).
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), dtype=torch.float32, safety_checker=None,
                                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name, mine in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        loaded = getattr(pipe, name).state_dict()
        for k, v in mine.state_dict().items():
            assert torch.equal(loaded[k], v), (name, k)
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"tiny-sd15: UNet {n_unet:,} parameters, text encoder {sum(p.numel() for p in te.parameters()):,}, "
          f"VAE {sum(p.numel() for p in vae.parameters()):,}; text encoder key prefix(es): {prefix}")
    index = {
        "about": "diffusers StableDiffusionImg2ImgPipeline references for onnx/fixtures/tiny-sd15 (float32, CPU): "
                 "the gateway's refinement of a given latent. See onnx/README.md.",
        "diffusers_version": importlib.import_module("diffusers").__version__,
        "torch_version": torch.__version__,
        "model": "../tiny-sd15",
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "text_encoder_key_prefix": prefix,
        "noise": "docs/protocol.md section 8 (diffusion/reference/noise.py); init latent seed 7 stream 0 x 0.8, "
                 "re-noising seed 42 stream 1, LCM step k seed 42 stream 1000 + k",
        "cases": {},
    }
    print("reference cases:")
    for case in case_list():
        info = run_case(case, pipe, ref_dir)
        index["cases"][case["name"]] = info
        print(f"  {case['name']:<16} {info['scheduler']:<28} t={info['timesteps']}")
    (ref_dir / "cases.json").write_text(json.dumps(jsonable(index), indent=2, allow_nan=False) + "\n")
    for p in (model_dir, ref_dir):
        total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()
                    and "tokenizer" not in f.relative_to(p).parts)
        print(f"{p.name}: {total / 1e6:.2f} MB (tokenizer symlink not counted)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=HERE / "fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    generate(args.fixtures)


if __name__ == "__main__":
    main()
