"""Regenerate the committed fixtures under onnx/fixtures/.

    python onnx/make_tiny.py [--fixtures DIR]

1. `tiny-sd/`: a tiny RANDOM-WEIGHT pipeline with the real Tiny-SD layout (see layouts.py), exported
   exactly like export.py exports real weights (optimum layout + diffusionx.json; only tokenizer.json
   and the small tokenizer configs; short tensor names to keep it small).
2. `tiny-sd-reference/`: diffusers' own pipelines run on the PyTorch weights (float32, CPU) for every
   scheduler / guidance / text-to-image / img2img case, as .npy (float32 unless noted, little-endian,
   C order) plus `cases.json`. Then the ONNX graphs are driven by onnxruntime through the same
   scheduler steps and the final latents compared, so the fixtures are known to agree.
3. `regression/qdq_softmax.onnx` (+ input / expected .npy): see quantize.py.
4. `tiny-sd/tiny_vae_decoder/`: a tiny RANDOM-WEIGHT diffusers `AutoencoderTiny` (TAESD's layout at
   8 channels) decoder, the kiosk's optional fast preview decoder, and in
   `tiny-sd-reference/tiny_vae_decoder/` diffusers' decode of a fixed latent.
   `python onnx/make_tiny.py --only tiny-decoder` rewrites just this part (and both manifests).
5. `tiny-sd-int8/` (dynamic quantization) and `tiny-sd-int8-weights/` (weight-only int8, the
   default of quantize.py): the tiny folder with an int8 UNet, everything else symlinked, each with
   onnxruntime's output of its UNet on a fixed input in `<name>-reference/`.
   `python onnx/make_tiny.py --only int8-weights` rewrites just the weight-only one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export  # noqa: E402
import layouts  # noqa: E402
import make_tokenizer  # noqa: E402
import quantize  # noqa: E402

SEED = 0  # model weights
PROMPT = "a red fox in the snow, watercolor"
NEGATIVE = "blurry"
GEN_SEED = 42  # torch.Generator seed passed to the pipeline
INIT_LATENT_SEED = 7
HEIGHT = WIDTH = 256
STEPS = 4
GUIDANCE = 7.5
STRENGTH = 0.5
IMAGE_CASES = {"ddim_t2i_cfg"}  # decoded images are 768 KB each: keep one


def schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    cfg = layouts.SD15_SCHEDULER_CONFIG
    return {
        "ddim": lambda: DDIMScheduler.from_config(cfg),
        "euler": lambda: EulerDiscreteScheduler.from_config(cfg),
        "dpmpp2m": lambda: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
        "lcm": lambda: LCMScheduler.from_config(cfg),
    }


def case_list():
    cases = []
    for name in ("ddim", "euler", "dpmpp2m", "lcm"):
        if name != "lcm":
            cases.append(dict(name=f"{name}_t2i_cfg", scheduler=name, mode="t2i", guidance=GUIDANCE, negative=NEGATIVE))
        cases.append(dict(name=f"{name}_t2i", scheduler=name, mode="t2i", guidance=1.0, negative=None))
        g = 1.0 if name == "lcm" else GUIDANCE
        cases.append(dict(name=f"{name}_img2img" + ("_cfg" if g > 1 else ""), scheduler=name, mode="img2img",
                          guidance=g, negative=NEGATIVE if g > 1 else None))
    return cases


class NoiseRecorder:
    """Wraps diffusers' `randn_tensor` where the pipelines and schedulers import it, to record every
    draw (in order, with the module that drew it). With `replay`, returns recorded tensors instead."""

    MODULES = [
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
        "diffusers.schedulers.scheduling_ddim",
        "diffusers.schedulers.scheduling_euler_discrete",
        "diffusers.schedulers.scheduling_dpmsolver_multistep",
        "diffusers.schedulers.scheduling_lcm",
    ]

    def __init__(self, replay=None):
        self.draws: list[tuple[str, torch.Tensor]] = []
        self.replay = list(replay) if replay is not None else None
        self._orig = {}

    def __enter__(self):
        import importlib

        for modname in self.MODULES:
            mod = importlib.import_module(modname)
            orig = mod.randn_tensor
            self._orig[modname] = orig

            def wrapped(*args, _orig=orig, _mod=modname, **kwargs):
                if self.replay is not None:
                    t = self.replay.pop(0)
                else:
                    t = _orig(*args, **kwargs)
                self.draws.append((_mod.rsplit(".", 1)[-1], t.clone()))
                return t

            mod.randn_tensor = wrapped
        return self

    def __exit__(self, *exc):
        import importlib

        for modname, orig in self._orig.items():
            importlib.import_module(modname).randn_tensor = orig


def save(path: Path, array) -> None:
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))))


def tokenize(tok, texts):
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids.astype(np.int64)


def init_latent():
    g = torch.Generator().manual_seed(INIT_LATENT_SEED)
    return torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=g)


def run_case(case, components, out: Path) -> dict:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    sched = schedulers()[case["scheduler"]]()
    comps = dict(components, scheduler=sched)
    cls = StableDiffusionPipeline if case["mode"] == "t2i" else StableDiffusionImg2ImgPipeline
    pipe = cls(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    d = out / case["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    embeds = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: embeds.append(kw["encoder_hidden_states"].clone()) if not embeds else None, with_kwargs=True)
    steps: list[torch.Tensor] = []
    timesteps: list[float] = []

    def on_step(p, i, t, kw):
        steps.append(kw["latents"].clone())
        timesteps.append(float(t))
        return kw

    cfg = case["guidance"] > 1.0
    kwargs = dict(prompt=PROMPT, negative_prompt=case["negative"], num_inference_steps=STEPS, guidance_scale=case["guidance"],
                  generator=torch.Generator("cpu").manual_seed(GEN_SEED), output_type="latent",
                  callback_on_step_end=on_step)
    if case["mode"] == "t2i":
        kwargs.update(height=HEIGHT, width=WIDTH)
    else:
        kwargs.update(image=init_latent(), strength=STRENGTH)
    with NoiseRecorder() as rec, torch.no_grad():
        final = pipe(**kwargs).images
    hook.remove()

    files = []

    def put(name, value):
        save(d / name, value)
        files.append(name)

    ids = tokenize(pipe.tokenizer, [case["negative"] or "", PROMPT] if cfg else [PROMPT])
    put("prompt_ids.npy", ids)
    put("prompt_embeds.npy", embeds[0])
    pipe_draws = [t for m, t in rec.draws if m.startswith("pipeline_")]
    step_draws = [t for m, t in rec.draws if m.startswith("scheduling_")]
    assert len(pipe_draws) == 1, [m for m, _ in rec.draws]
    put("init_noise.npy", pipe_draws[0])
    if case["mode"] == "img2img":
        put("init_latent.npy", init_latent())
    for k, t in enumerate(step_draws):
        put(f"step_noise{k}.npy", t)
    put("timesteps.npy", np.array(timesteps, dtype=np.float32))
    for k, lat in enumerate(steps):
        put(f"latents_step{k}.npy", lat)
    put("final_latent.npy", final)
    if case["name"] in IMAGE_CASES:
        with torch.no_grad():
            img = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
        put("image.npy", (img / 2 + 0.5).clamp(0, 1))
    info = dict(
        scheduler=type(sched).__name__,
        # `_use_default_values` is built from a set: its order changes between runs.
        scheduler_config={k: sorted(v) if k == "_use_default_values" else v for k, v in dict(sched.config).items()},
        mode=case["mode"],
        steps=STEPS,
        steps_run=len(steps),
        guidance_scale=case["guidance"],
        strength=STRENGTH if case["mode"] == "img2img" else None,
        prompt=PROMPT,
        negative_prompt=case["negative"],
        seed=GEN_SEED,
        init_latent_seed=INIT_LATENT_SEED if case["mode"] == "img2img" else None,
        height=HEIGHT,
        width=WIDTH,
        init_noise_sigma=float(sched.init_noise_sigma),
        timesteps=timesteps,
        files=sorted(files),
    )
    if hasattr(sched, "sigmas"):
        info["sigmas"] = [float(s) for s in sched.sigmas]
    return info


def ort_replay(case: dict, info: dict, onnx_dir: Path, ref_dir: Path) -> float:
    """Drive the exported graphs with onnxruntime through the same diffusers scheduler; return
    max |final latent - reference|."""
    sched = schedulers()[case["scheduler"]]()
    d = ref_dir / case["name"]
    te = export._ort(onnx_dir / "text_encoder" / "model.onnx")
    unet = export._ort(onnx_dir / "unet" / "model.onnx")
    ids = np.load(d / "prompt_ids.npy")
    emb = te.run(["last_hidden_state"], {"input_ids": ids})[0]
    cfg = case["guidance"] > 1.0
    noise = torch.from_numpy(np.load(d / "init_noise.npy"))
    sched.set_timesteps(STEPS)
    timesteps = sched.timesteps
    if case["mode"] == "t2i":
        latents = noise * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps
        init_t = min(int(STEPS * STRENGTH), STEPS)
        t_start = max(STEPS - init_t, 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(torch.from_numpy(np.load(d / "init_latent.npy")), noise, timesteps[:1])
    step_noise = [torch.from_numpy(np.load(d / f)) for f in sorted(info["files"]) if f.startswith("step_noise")]
    with NoiseRecorder(replay=step_noise):
        for t in timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x, t)
            eps = unet.run(None, {"sample": x.numpy(), "timestep": np.array(float(t), dtype=np.float32),
                                  "encoder_hidden_states": emb})[0]
            eps = torch.from_numpy(eps)
            if cfg:
                u, c = eps.chunk(2)
                eps = u + case["guidance"] * (c - u)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
    return float((latents - torch.from_numpy(np.load(d / "final_latent.npy"))).abs().max())


INT8_FIXTURES = {"dynamic": "tiny-sd-int8", "weights": "tiny-sd-int8-weights"}


def write_int8_fixture(fixtures: Path, mode: str) -> None:
    """`tiny-sd-int8` (`mode` dynamic) or `tiny-sd-int8-weights` (weight-only): the tiny folder with
    an int8 UNet. Every other entry is a symlink into `tiny-sd`, so the fixture adds only the int8
    graph. Beside it, `<name>-reference/` holds onnxruntime's output of that int8 UNet on a fixed
    input, so the Rust test checks tract's int8 path against onnxruntime's, not just against f32."""
    import onnxruntime as ort

    name = INT8_FIXTURES[mode]
    src, out, ref = fixtures / "tiny-sd", fixtures / name, fixtures / f"{name}-reference"
    for p in (out, ref):
        if p.exists():
            shutil.rmtree(p)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "q"
        quantize.quantize_folder(src, quantized, graphs=("unet",), mode=mode)
        out.mkdir()
        for entry in sorted(src.iterdir()):
            if entry.name not in ("unet", export.MANIFEST):
                (out / entry.name).symlink_to(Path("..") / "tiny-sd" / entry.name)
        (out / "unet").mkdir()
        shutil.copy(quantized / "unet" / "model.onnx", out / "unet" / "model.onnx")
        shutil.copy(quantized / export.MANIFEST, out / export.MANIFEST)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    embeds = rng.standard_normal((2, 77, 4)).astype(np.float32)
    timestep = np.array(501.0, dtype=np.float32)
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeds})
    ref.mkdir()
    save(ref / "unet_sample.npy", sample)
    save(ref / "unet_encoder_hidden_states.npy", embeds)
    save(ref / "unet_timestep.npy", timestep)
    save(ref / "unet_out_sample.npy", result)


TINY_DECODER_SEED = 3
TINY_DECODER_LATENT = (1, 4, 16, 12)  # not square, so a transposed plane shows


def tiny_vae():
    """TAESD's layout (diffusers' AutoencoderTiny defaults: blocks 3/3/3/1, ReLU, nearest x2
    upsampling) at 8 channels instead of 64, random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(TINY_DECODER_SEED)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)).eval()
    # He initialisation keeps the ReLU stack's activations at unit scale (PyTorch's default shrinks
    # them ~3x per layer, which left a flat grey image), so the picture has structure to compare.
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(0.5)
                if m.bias is not None:
                    torch.nn.init.normal_(m.bias, std=0.1)
    return vae


def write_tiny_decoder_fixture(fixtures: Path) -> None:
    """Adds `tiny_vae_decoder/` to `tiny-sd` (and, as a symlink, to the int8 fixtures), rewrites their
    manifests, and writes diffusers' decode of a fixed latent: `latent.npy` (scaled, as the UNet
    sees it) and `image.npy` (`vae.decode(latent / vae.config.scaling_factor)`, as diffusers'
    pipelines call it, [-1, 1])."""
    onnx_dir = fixtures / "tiny-sd"
    ref = fixtures / "tiny-sd-reference" / export.TINY_VAE_DECODER
    for p in (onnx_dir / export.TINY_VAE_DECODER, ref):
        if p.exists():
            shutil.rmtree(p)
    vae = tiny_vae()
    export.add_tiny_vae_decoder(vae, onnx_dir, opset=17, short_names=True,
                                source=f"random weights: onnx/make_tiny.py (AutoencoderTiny, 8 channels, "
                                       f"torch.manual_seed({TINY_DECODER_SEED}))")
    g = torch.Generator().manual_seed(TINY_DECODER_SEED)
    latent = torch.randn(*TINY_DECODER_LATENT, generator=g) * 1.5
    with torch.no_grad():
        image = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
    save(ref / "latent.npy", latent[0])
    save(ref / "image.npy", image[0])
    print(f"  tiny decoder image range [{float(image.min()):.3f}, {float(image.max()):.3f}], std {float(image.std()):.3f}")
    for int8_dir in (fixtures / name for name in INT8_FIXTURES.values()):
        if not int8_dir.exists():
            continue
        link = int8_dir / export.TINY_VAE_DECODER
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / "tiny-sd" / export.TINY_VAE_DECODER)
        export.refresh_manifest(int8_dir, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=HERE / "fixtures")
    ap.add_argument("--only", choices=["tiny-decoder", "int8-weights"], help="regenerate only this part")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only == "tiny-decoder":
        write_tiny_decoder_fixture(args.fixtures)
        return
    if args.only == "int8-weights":
        write_int8_fixture(args.fixtures, "weights")
        return
    from transformers import CLIPTokenizer

    onnx_dir = args.fixtures / "tiny-sd"
    ref_dir = args.fixtures / "tiny-sd-reference"
    for p in (onnx_dir, ref_dir):
        if p.exists():
            shutil.rmtree(p)
    te, unet, vae = layouts.build(full=False, seed=SEED)
    export.export_pipeline(te, unet, vae, layouts.SD15_SCHEDULER_CONFIG, onnx_dir, opset=17,
                           source=f"random weights: onnx/make_tiny.py (layouts.py tiny Tiny-SD layout, torch.manual_seed({SEED}))",
                           source_dir=None, resolutions=[(256, 256), (320, 192)], minimal_tokenizer=True,
                           short_names=True)
    make_tok_check = CLIPTokenizer.from_pretrained(str(onnx_dir / "tokenizer"))
    components = dict(vae=vae, text_encoder=te, tokenizer=make_tok_check, unet=unet)
    index = {
        "about": "diffusers reference outputs for onnx/fixtures/tiny-sd (float32, CPU). See onnx/README.md.",
        "diffusers_version": export._diffusers_version(),
        "torch_version": torch.__version__,
        "model": "../tiny-sd",
        "vae_scaling_factor": vae.config.scaling_factor,
        "cases": {},
    }
    print("reference cases:")
    for case in case_list():
        info = run_case(case, components, ref_dir)
        index["cases"][case["name"]] = info
        print(f"  {case['name']:<22} {info['scheduler']:<28} t={info['timesteps']}")
    print("onnxruntime replay vs diffusers (max abs diff of final latents):")
    for case in case_list():
        diff = ort_replay(case, index["cases"][case["name"]], onnx_dir, ref_dir)
        index["cases"][case["name"]]["ort_final_latent_max_abs_diff"] = float(f"{diff:.3e}")
        print(f"  {case['name']:<22} {diff:.3e}")
    (ref_dir / "cases.json").write_text(json.dumps(index, indent=2) + "\n")
    write_tiny_decoder_fixture(args.fixtures)
    quantize.write_qdq_softmax_fixture(args.fixtures / "regression")
    for mode in INT8_FIXTURES:
        write_int8_fixture(args.fixtures, mode)
    make_tokenizer.write_id_fixture(onnx_dir / "tokenizer", args.fixtures / "tokenizer-ids.json")
    total = sum(p.stat().st_size for p in args.fixtures.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB")
    # the gateway's SD v1.5-layout fixtures (tiny-sd15/ symlinks tiny-sd/tokenizer)
    import make_tiny_sd15  # noqa: E402

    make_tiny_sd15.generate(args.fixtures)


if __name__ == "__main__":
    main()
