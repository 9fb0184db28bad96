"""Export a diffusers Stable Diffusion 1.x folder to the optimum ONNX layout, plus our manifest.

    python onnx/export.py --diffusers DIR --out DIR [--opset 17] [--check 256x256 ...] [--tiny-decoder TAESD_DIR]
    python onnx/export.py --out DIR --tiny-decoder TAESD_DIR     (add the preview decoder to a folder)

Layout written (the one `optimum-cli export onnx` writes for a Stable Diffusion pipeline):

    model_index.json
    scheduler/scheduler_config.json
    tokenizer/{tokenizer.json, tokenizer_config.json, special_tokens_map.json[, vocab.json, merges.txt]}
    text_encoder/model.onnx   input_ids int64 [batch, sequence]   -> last_hidden_state f32 [batch, sequence, D],
                                                                      pooler_output f32 [batch, D]
    unet/model.onnx           sample f32 [batch, 4, h, w], timestep f32 [] (a scalar, as optimum),
                              encoder_hidden_states f32 [batch, sequence, D] -> out_sample f32 [batch, 4, h, w]
    vae_decoder/model.onnx    latent_sample f32 [batch, 4, h, w] (latents / scaling_factor)
                                                                   -> sample f32 [batch, 3, 8h, 8w] in [-1, 1]
    vae_encoder/model.onnx    sample f32 [batch, 3, H, W] in [-1, 1]
                                  -> latent_parameters f32 [batch, 8, H/8, W/8] (mean ++ logvar, unclamped)
    tiny_vae_decoder/model.onnx   optional (--tiny-decoder): a diffusers AutoencoderTiny's decoder (TAESD)
                              latent_sample f32 [batch, 4, h, w] (the UNet's latents, scaled as the UNet sees them)
                                                                   -> sample f32 [batch, 3, 8h, 8w], about [-1, 1]
    diffusionx.json           our manifest (format, precision, sha256 of every file, checked resolutions, ...)

The graphs are written with the legacy TorchScript exporter (`dynamo=False`) at opset 17: in a scratch
run the dynamo exporter at opset 17 wrote a UNet that onnxruntime refused. Every graph is checked
against PyTorch with onnxruntime and the max abs difference printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tokenizer  # noqa: E402

MANIFEST = "diffusionx.json"
MANIFEST_FORMAT = 1
TEXT_SEQ = 77


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """optimum's vae_decoder: `vae.decode(z)` (post_quant_conv + decoder); input is latents / scaling_factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """optimum's vae_encoder: `vae.encode(x).latent_dist.parameters` (encoder + quant_conv, 2*latent channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


class TinyVaeDecoder(torch.nn.Module):
    """A diffusers `AutoencoderTiny` (TAESD) decoder taking the UNet's latents: diffusers' pipelines
    call `vae.decode(latents / vae.config.scaling_factor)`, and the division is folded into the graph
    (TAESD's factor is 1.0), so the kiosk feeds the graph the latent it already has."""

    def __init__(self, tiny_vae):
        super().__init__()
        self.tiny_vae = tiny_vae
        self.scaling_factor = float(tiny_vae.config.scaling_factor)

    def forward(self, latent_sample):
        return self.tiny_vae.decode(latent_sample / self.scaling_factor, return_dict=False)[0]


TINY_VAE_DECODER = "tiny_vae_decoder"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_label(folder: Path) -> str:
    """How the manifest names a diffusers source folder: the folder's name and the sha256 of the
    file that says what it holds (`model_index.json` for a pipeline, `config.json` for a single
    model such as a TAESD folder). Never its absolute path: the same weights exported on two
    machines, or from two places, give the same manifest, and the image does not carry the
    build host's paths (`python -m doctest onnx/export.py` checks this).

    >>> import tempfile
    >>> a, b = (Path(tempfile.mkdtemp()) / "tiny-sd" for _ in range(2))
    >>> for d in (a, b):
    ...     d.mkdir()
    ...     _ = (d / "model_index.json").write_text("{}")
    >>> source_label(a) == source_label(b)
    True
    >>> source_label(a)
    'diffusers:tiny-sd (model_index.json sha256 44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a)'
    """
    folder = folder.resolve()
    for name in ("model_index.json", "config.json"):
        if (folder / name).is_file():
            return f"diffusers:{folder.name} ({name} sha256 {sha256(folder / name)})"
    return f"diffusers:{folder.name}"


def _export(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if model.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(model)


def compact_names(path: Path) -> None:
    """Rename nodes and intermediate tensors to short names (n12 / t34). Graph inputs, outputs and
    initializers keep their names. Only used for the committed fixtures: the long scope names of the
    legacy exporter are more than half of a tiny graph's bytes."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {i.name for i in g.initializer}
    mapping: dict[str, str] = {}
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.doc_string = ""
        for k, name in enumerate(node.output):
            if name and name not in keep:
                mapping[name] = f"t{len(mapping)}"
                node.output[k] = mapping[name]
        for k, name in enumerate(node.input):
            if name in mapping:
                node.input[k] = mapping[name]
    for vi in g.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def export_text_encoder(text_encoder, out: Path, opset: int) -> None:
    ids = torch.full((1, TEXT_SEQ), make_tokenizer.EOS_ID, dtype=torch.int64)
    ids[0, :4] = torch.tensor([make_tokenizer.BOS_ID, 320, 736, make_tokenizer.EOS_ID])
    _export(
        TextEncoder(text_encoder).eval(),
        (ids,),
        out / "text_encoder" / "model.onnx",
        ["input_ids"],
        ["last_hidden_state", "pooler_output"],
        {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
            "pooler_output": {0: "batch_size"},
        },
        opset,
    )


def export_unet(unet, out: Path, opset: int, latent_hw=(32, 32)) -> None:
    d = unet.config.cross_attention_dim
    c = unet.config.in_channels
    args = (
        torch.randn(2, c, *latent_hw),
        torch.tensor(999.0, dtype=torch.float32),  # scalar, like optimum
        torch.randn(2, TEXT_SEQ, d),
    )
    _export(
        UNet(unet).eval(),
        args,
        out / "unet" / "model.onnx",
        ["sample", "timestep", "encoder_hidden_states"],
        ["out_sample"],
        {
            "sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"},
        },
        opset,
    )


def export_vae(vae, out: Path, opset: int, latent_hw=(32, 32)) -> None:
    f = 2 ** (len(vae.config.down_block_types) - 1)
    lc = vae.config.latent_channels
    _export(
        VaeDecoder(vae).eval(),
        (torch.randn(1, lc, *latent_hw),),
        out / "vae_decoder" / "model.onnx",
        ["latent_sample"],
        ["sample"],
        {
            "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: f"latent_height * {f}", 3: f"latent_width * {f}"},
        },
        opset,
    )
    _export(
        VaeEncoder(vae).eval(),
        (torch.rand(1, vae.config.in_channels, latent_hw[0] * f, latent_hw[1] * f) * 2 - 1,),
        out / "vae_encoder" / "model.onnx",
        ["sample"],
        ["latent_parameters"],
        {
            "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
            "latent_parameters": {0: "batch_size", 2: f"sample_height / {f}", 3: f"sample_width / {f}"},
        },
        opset,
    )


def export_tiny_vae_decoder(tiny_vae, out: Path, opset: int, latent_hw=(32, 32)) -> None:
    lc = tiny_vae.config.latent_channels
    f = tiny_vae.config.upsampling_scaling_factor ** (len(tiny_vae.config.decoder_block_out_channels) - 1)
    _export(
        TinyVaeDecoder(tiny_vae).eval(),
        (torch.randn(1, lc, *latent_hw),),
        out / TINY_VAE_DECODER / "model.onnx",
        ["latent_sample"],
        ["sample"],
        {
            "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: f"latent_height * {f}", 3: f"latent_width * {f}"},
        },
        opset,
    )


def verify_tiny_vae_decoder(tiny_vae, out: Path, latent_sizes, seed: int = 0) -> float:
    """The largest |onnxruntime - PyTorch| of the tiny decoder over `latent_sizes` (h, w)."""
    g = torch.Generator().manual_seed(seed)
    sess = _ort(out / TINY_VAE_DECODER / "model.onnx")
    worst = 0.0
    for lh, lw in latent_sizes:
        z = torch.randn(1, tiny_vae.config.latent_channels, lh, lw, generator=g) * 2.0
        with torch.no_grad():
            ref = TinyVaeDecoder(tiny_vae)(z)
        diff = _diff(sess.run(None, {"latent_sample": z.numpy()})[0], ref)
        print(f"  tiny_vae_decoder {lh * 8}x{lw * 8}  max|ort - torch| = {diff:.3e}")
        worst = max(worst, diff)
    return worst


def load_tiny_vae(folder: Path):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def add_tiny_vae_decoder(tiny_vae, out: Path, *, opset: int, source: str, short_names: bool = False,
                         verify_graph: bool = True) -> dict:
    """Export `tiny_vae`'s decoder into the model folder `out` (written by `export_pipeline`) and
    rewrite the manifest: every file re-hashed, the decoder's source and check recorded."""
    manifest = json.loads((out / MANIFEST).read_text())
    if tiny_vae.config.latent_channels != 4:
        raise SystemExit(f"the tiny decoder takes {tiny_vae.config.latent_channels} latent channels, SD 1.x has 4")
    print(f"exporting {TINY_VAE_DECODER} -> {out}")
    export_tiny_vae_decoder(tiny_vae, out, opset)
    if short_names:
        compact_names(out / TINY_VAE_DECODER / "model.onnx")
    info = {"source": source}
    if verify_graph:
        sizes = [(h // 8, w // 8) for h, w in manifest.get("checked_resolutions", [])] or [(32, 32)]
        info["max_abs_diff_vs_torch"] = float(f"{verify_tiny_vae_decoder(tiny_vae, out, sizes):.3e}")
    return refresh_manifest(out, {TINY_VAE_DECODER: info})


def refresh_manifest(out: Path, extra: dict) -> dict:
    """Re-hash every file of `out` (symlinked folders followed) into its manifest and merge `extra`
    into the manifest's other keys."""
    manifest = json.loads((out / MANIFEST).read_text())
    files = {}
    for root, _dirs, names in os.walk(out, followlinks=True):
        for name in names:
            p = Path(root) / name
            rel = p.relative_to(out).as_posix()
            if rel != MANIFEST:
                files[rel] = sha256(p)
    manifest["files"] = dict(sorted(files.items()))
    manifest.update(extra)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(text_encoder, unet, vae, out: Path, resolutions, seed: int = 0, skip_vae_encoder_above: int = 1 << 30):
    """Run each graph in onnxruntime and in PyTorch; return {graph: max abs diff}."""
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(vae.config.down_block_types) - 1)
    diffs: dict[str, float] = {}

    def record(name, value):
        diffs[name] = max(diffs.get(name, 0.0), value)
        print(f"  {name:<28} max|ort - torch| = {value:.3e}")

    sess = _ort(out / "text_encoder" / "model.onnx")
    ids = np.full((2, TEXT_SEQ), make_tokenizer.EOS_ID, dtype=np.int64)
    ids[:, 0] = make_tokenizer.BOS_ID
    ids[0, 1:3] = [320, 736]
    ids[1, 1:6] = [3240, 530, 518, 2583, 14211]
    ids[1, 6] = make_tokenizer.EOS_ID
    with torch.no_grad():
        ref = TextEncoder(text_encoder)(torch.from_numpy(ids))
    got = sess.run(None, {"input_ids": ids})
    record("text_encoder.last_hidden_state", _diff(got[0], ref[0]))
    record("text_encoder.pooler_output", _diff(got[1], ref[1]))

    sess_u = _ort(out / "unet" / "model.onnx")
    sess_d = _ort(out / "vae_decoder" / "model.onnx")
    sess_e = _ort(out / "vae_encoder" / "model.onnx")
    d = unet.config.cross_attention_dim
    for h, w in resolutions:
        lh, lw = h // f, w // f
        for b in (1, 2):
            x = torch.randn(b, unet.config.in_channels, lh, lw, generator=g)
            e = torch.randn(b, TEXT_SEQ, d, generator=g)
            t = torch.tensor(501.0)
            with torch.no_grad():
                ref = UNet(unet)(x, t, e)
            got = sess_u.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()})[0]
            record(f"unet {h}x{w} b{b}", _diff(got, ref))
        z = torch.randn(1, vae.config.latent_channels, lh, lw, generator=g)
        with torch.no_grad():
            ref = VaeDecoder(vae)(z)
        record(f"vae_decoder {h}x{w}", _diff(sess_d.run(None, {"latent_sample": z.numpy()})[0], ref))
        if h * w <= skip_vae_encoder_above:
            img = torch.rand(1, vae.config.in_channels, h, w, generator=g) * 2 - 1
            with torch.no_grad():
                ref = VaeEncoder(vae)(img)
            record(f"vae_encoder {h}x{w}", _diff(sess_e.run(None, {"sample": img.numpy()})[0], ref))
    return diffs


def model_index(source_dir: Path | None) -> dict:
    if source_dir is not None and (source_dir / "model_index.json").exists():
        idx = json.loads((source_dir / "model_index.json").read_text())
    else:
        idx = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version()}
    # optimum's ORT pipeline index: the ONNX components replace the torch ones.
    for k in ("unet", "vae", "text_encoder", "safety_checker", "feature_extractor", "image_encoder"):
        idx.pop(k, None)
    idx.update(
        {
            "_class_name": "ORTStableDiffusionPipeline",
            "scheduler": ["diffusers", idx.get("scheduler", [None, "PNDMScheduler"])[1]],
            "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["onnxruntime", "ORTModelUnet"],
            "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
            "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
            "requires_safety_checker": False,
        }
    )
    return idx


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_configs(out: Path, scheduler_config: dict, source_dir: Path | None, minimal_tokenizer: bool) -> None:
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n")
    (out / "model_index.json").write_text(json.dumps(model_index(source_dir), indent=2, sort_keys=True) + "\n")
    make_tokenizer.write_tokenizer(out / "tokenizer", minimal=minimal_tokenizer)
    # Keep the original component configs next to the graphs (optimum does the same); small.
    if source_dir is not None:
        for comp, cfg in (("unet", "config.json"), ("text_encoder", "config.json"), ("vae", "config.json")):
            src = source_dir / comp / cfg
            if src.exists():
                dst_dirs = ["vae_decoder", "vae_encoder"] if comp == "vae" else [comp]
                for dd in dst_dirs:
                    shutil.copyfile(src, out / dd / cfg)


def write_manifest(out: Path, precision: str, checked_resolutions, vae_scaling_factor: float, text_hidden_size: int, source: str, extra: dict | None = None) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(out).as_posix()] = sha256(p)
    manifest = {
        "format": MANIFEST_FORMAT,
        "precision": precision,
        "files": files,
        "checked_resolutions": [[int(h), int(w)] for h, w in checked_resolutions],
        "vae_scaling_factor": float(vae_scaling_factor),
        "text_hidden_size": int(text_hidden_size),
        "source": source,
    }
    if extra:
        manifest.update(extra)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_pipeline(text_encoder, unet, vae, scheduler_config: dict, out: Path, *, opset: int, source: str,
                    source_dir: Path | None, resolutions, minimal_tokenizer: bool = False, verify_graphs: bool = True,
                    skip_vae_encoder_above: int = 1 << 30, short_names: bool = False) -> dict:
    """Export all four graphs + configs + manifest into `out`. Returns the manifest."""
    text_encoder.eval(), unet.eval(), vae.eval()
    out.mkdir(parents=True, exist_ok=True)
    f = 2 ** (len(vae.config.down_block_types) - 1)
    h0, w0 = resolutions[0]
    print(f"exporting text_encoder -> {out}")
    export_text_encoder(text_encoder, out, opset)
    print("exporting unet")
    export_unet(unet, out, opset, (h0 // f, w0 // f))
    print("exporting vae_decoder, vae_encoder")
    export_vae(vae, out, opset, (h0 // f, w0 // f))
    if short_names:
        for g in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            compact_names(out / g / "model.onnx")
    write_configs(out, scheduler_config, source_dir, minimal_tokenizer)
    diffs = {}
    if verify_graphs:
        print("verifying with onnxruntime against PyTorch")
        diffs = verify(text_encoder, unet, vae, out, resolutions, skip_vae_encoder_above=skip_vae_encoder_above)
    return write_manifest(
        out,
        "f32",
        resolutions if verify_graphs else [],
        vae.config.scaling_factor,
        text_encoder.config.hidden_size,
        source,
        {"opset": opset, "max_abs_diff_vs_torch": {k: float(f"{v:.3e}") for k, v in diffs.items()}} if verify_graphs else {"opset": opset},
    )


def load_diffusers(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32, attn_implementation="eager")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return te, unet, vae, sched


def check_source_tokenizer(folder: Path, out: Path) -> None:
    """If the source folder has a tokenizer, our rebuilt one must give the same ids."""
    src = folder / "tokenizer"
    if not src.exists():
        return
    from transformers import CLIPTokenizer

    a = CLIPTokenizer.from_pretrained(str(src))
    b = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    if a.pad_token_id != b.pad_token_id:
        raise SystemExit(f"source tokenizer pads with id {a.pad_token_id}, ours with {b.pad_token_id}: not an SD 1.x tokenizer")
    ia = make_tokenizer.diffusers_ids(a, make_tokenizer.CHECK_PROMPTS)
    ib = make_tokenizer.diffusers_ids(b, make_tokenizer.CHECK_PROMPTS)
    if not (ia == ib).all():
        raise SystemExit("the source folder's tokenizer disagrees with the CLIP ViT-L/14 tokenizer")
    print("source tokenizer agrees with the rebuilt one")


def parse_res(s: str) -> tuple[int, int]:
    h, w = s.lower().split("x")
    return int(h), int(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers", type=Path, help="diffusers StableDiffusionPipeline folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny-decoder", type=Path,
                    help="diffusers AutoencoderTiny folder (e.g. madebyollin/taesd): its decoder is added as "
                         f"{TINY_VAE_DECODER}/model.onnx, the kiosk's fast preview decoder; without --diffusers it "
                         "is added to the existing folder --out")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--check", type=parse_res, nargs="+", default=[(256, 256), (512, 384)],
                    help="resolutions HxW verified with onnxruntime (and listed in the manifest)")
    ap.add_argument("--minimal-tokenizer", action="store_true", help="write only tokenizer.json + configs")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.diffusers is None:
        if args.tiny_decoder is None:
            ap.error("give --diffusers (a pipeline to export) and/or --tiny-decoder (to add to --out)")
        if not (args.out / MANIFEST).is_file():
            raise SystemExit(f"{args.out} has no {MANIFEST}: export the pipeline there first")
        m = add_tiny_vae_decoder(load_tiny_vae(args.tiny_decoder), args.out, opset=args.opset,
                                 source=source_label(args.tiny_decoder), verify_graph=not args.no_verify)
        print(json.dumps(m[TINY_VAE_DECODER], indent=2))
        return
    te, unet, vae, sched = load_diffusers(args.diffusers)
    m = export_pipeline(te, unet, vae, sched, args.out, opset=args.opset, source=source_label(args.diffusers),
                        source_dir=args.diffusers, resolutions=args.check, minimal_tokenizer=args.minimal_tokenizer,
                        verify_graphs=not args.no_verify)
    check_source_tokenizer(args.diffusers, args.out)
    if args.tiny_decoder is not None:
        m = add_tiny_vae_decoder(load_tiny_vae(args.tiny_decoder), args.out, opset=args.opset,
                                 source=source_label(args.tiny_decoder), verify_graph=not args.no_verify)
    print(json.dumps({k: v for k, v in m.items() if k != "files"}, indent=2))


if __name__ == "__main__":
    main()
