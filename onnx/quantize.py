"""Quantize an exported model folder to int8 in a form tract runs correctly.

    python onnx/quantize.py --model DIR --out DIR [--mode weights|dynamic]
                            [--bind batch_size=2,height=32,width=32]
                            [--per-channel] [--quantize-embeddings] [--graphs unet text_encoder]

Two forms, both int8 weights in the file and in tract's memory:

- `--mode weights` (the default): weight-only int8 (`quantize_graph_weights`): every constant
  weight of a MatMul / Gemm / Conv as int8 with one f32 scale per output channel behind a standard
  DequantizeLinear; activations and products stay f32. The engine dequantizes each weight per call
  straight into its matrix product's panels (`appliance/engine/src/weights.rs`). Full-size Tiny-SD
  UNet on a 2-core AMD EPYC (docs/benchmarks.md): 1.0-1.1x the f32 time at 36% of its peak memory;
  the pictures are the f32 pipeline's to within the weights' rounding.
- `--mode dynamic`: onnxruntime's dynamic quantization, described below. tract runs it 4x slower
  than f32 on AVX2 and its activations are rounded to 8 bits per call; kept for comparison.

What the dynamic form does, and why (findings from a scratch experiment with tract-onnx 0.23.9):

- Dynamic quantization (onnxruntime `quantize_dynamic`): weights int8 (per tensor by default),
  activations quantized at run time with DynamicQuantizeLinear, MatMul -> MatMulInteger,
  Conv -> ConvInteger. tract loads and runs these. ONNX Runtime's QOperator static format is NOT
  used: tract rejects it (QLinearAdd / QLinearMul are unimplemented).
- Only MatMul / Gemm / Conv whose weight is a constant initializer are quantized. The attention's
  activation x activation MatMuls (Q.K^T and P.V) and its Softmax stay float: in a QDQ graph
  tract folds `DequantizeLinear -> Softmax -> QuantizeLinear` into an element-wise lookup table, so
  every attention probability becomes 1.0 (wrong pictures, no error). Dynamic quantization never
  puts Softmax between Q/DQ, and excluding the activation MatMuls keeps P itself float.
- The quantizer runs ONNX shape inference and leaves `value_info` with fresh symbolic dims
  (`unk__123`) that tract cannot unify with the concrete input shapes. We drop all intermediate
  `value_info` (tract infers shapes from the inputs it is given). `--bind` additionally replaces the
  named input/output dims by concrete values before quantizing (a fully static graph, for a single
  shape; the Rust side otherwise binds the shapes with `with_input_fact` before optimizing).
- VAE graphs are copied unchanged (f32): they are convolution-heavy at high resolution, their
  error shows directly in the picture, and they are not the memory problem the UNet is.

Also writes the tract regression graph (`write_qdq_softmax_fixture`), used by make_tiny.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUANTIZED_GRAPHS = ("unet", "text_encoder")


def const_weight_nodes(model) -> tuple[list[str], list[str]]:
    """Return (nodes to quantize, MatMul nodes to exclude): MatMul/Gemm/Conv whose input 1 is an
    initializer (possibly through Transpose/Identity of one) are weight products."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def is_const(name: str) -> bool:
        for _ in range(5):
            if name in inits:
                return True
            n = producers.get(name)
            if n is None:
                return False
            if n.op_type == "Constant":
                return True
            if n.op_type not in ("Transpose", "Identity"):
                return False
            name = n.input[0]
        return False

    include, exclude = [], []
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            (include if is_const(n.input[1]) else exclude).append(n.name)
    return include, exclude


def bind_dims(model, binding: dict[str, int]):
    """Replace symbolic dims named in `binding` by concrete values on graph inputs and outputs."""
    for v in list(model.graph.input) + list(model.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in binding:
                d.dim_value = binding[d.dim_param]
    return model


def load_named(src: Path, binding: dict[str, int] | None):
    """The ONNX model at `src` with every node named (the quantizers match nodes by name) and the
    dims in `binding` made concrete."""
    import onnx

    model = onnx.load(str(src))
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    if binding:
        bind_dims(model, binding)
    return model


def strip_value_info(model):
    del model.graph.value_info[:]
    return model


def quantize_graph(src: Path, dst: Path, *, binding: dict[str, int] | None, per_channel: bool,
                   embeddings: bool) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_named(src, binding)
    include, exclude = const_weight_nodes(model)
    op_types = ["MatMul", "Gemm", "Conv"] + (["Gather"] if embeddings else [])
    if embeddings:
        include += [n.name for n in model.graph.node if n.op_type == "Gather"
                    and n.input[0] in {i.name for i in model.graph.initializer}]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "in.onnx"
        onnx.save(model, str(pre))
        quantize_dynamic(
            str(pre),
            str(dst),
            op_types_to_quantize=op_types,
            nodes_to_quantize=include,
            nodes_to_exclude=exclude,
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    q = onnx.load(str(dst))
    strip_value_info(q)
    onnx.checker.check_model(q)
    onnx.save(q, str(dst))
    ops: dict[str, int] = {}
    for n in q.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    assert not any(o.startswith("QLinear") for o in ops), ops
    return {"weight_nodes_quantized": len(include), "activation_matmuls_kept_float": len(exclude),
            "ops": {k: ops[k] for k in sorted(ops) if k in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                                                            "DequantizeLinear", "MatMul", "Conv", "Softmax", "Gemm")}}


def quantize_graph_weights(src: Path, dst: Path, *, binding: dict[str, int] | None) -> dict:
    """Weight-only int8: every constant weight of a MatMul / Gemm / Conv becomes an int8 initializer
    with one f32 scale per output channel (symmetric, zero point 0) and a standard
    `DequantizeLinear` in front of its product; activations and every product stay f32.

    The file holds a quarter of the f32 weights' bytes, and so does the engine's plan of it: it
    parses these nodes into its own dequantization, which tract never folds into an f32 constant,
    and writes each weight per call straight into the panels of its matrix product
    (`appliance/engine/src/weights.rs`). Plain tract would fold every weight under a million
    values into f32 and dequantize the rest in four passes per call. onnxruntime runs the file
    too (it turns `DequantizeLinear -> MatMul` into its 8-bit `MatMulNBits`)."""
    import onnx
    from onnx import helper, numpy_helper

    model = load_named(src, binding)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    quantized: dict[str, str] = {}  # f32 weight name -> name of its dequantized output (same name)
    new_nodes = []
    per_op: dict[str, int] = {}
    bytes_f32 = bytes_i8 = 0
    worst = 0.0
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        w_name = n.input[1]
        if w_name in quantized or w_name not in inits:
            continue
        w = numpy_helper.to_array(inits[w_name])
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            if w.ndim != 2:
                continue
            axis = 1
        reduce = tuple(a for a in range(w.ndim) if a != axis)
        amax = np.abs(w).max(axis=reduce)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        worst = max(worst, float(np.abs(q.astype(np.float32) * scale.reshape(shape) - w).max()))
        q_name, s_name = f"{w_name}_int8", f"{w_name}_scale"
        g.initializer.remove(inits.pop(w_name))
        g.initializer.append(numpy_helper.from_array(q, q_name))
        g.initializer.append(numpy_helper.from_array(scale, s_name))
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [w_name],
                                          name=f"{w_name}_dequantize", axis=axis))
        quantized[w_name] = w_name
        per_op[n.op_type] = per_op.get(n.op_type, 0) + 1
        bytes_f32 += w.size * 4
        bytes_i8 += w.size + scale.size * 4
    # DequantizeLinear nodes first: the graph stays topologically sorted
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    strip_value_info(model)
    # int8 DequantizeLinear with per-axis scales needs opset 13
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < 13:
            o.version = 13
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {"weights_quantized": len(quantized), "by_op": dict(sorted(per_op.items())),
            "weight_bytes_f32": bytes_f32, "weight_bytes_int8": bytes_i8,
            "max_abs_weight_error": float(f"{worst:.3e}")}


def compare(f32_dir: Path, q_dir: Path, hw=(32, 32), seed: int = 0) -> dict:
    """Max abs difference int8 vs f32 on one random input per graph (onnxruntime)."""
    import export

    rng = np.random.default_rng(seed)
    out = {}
    a, b = export._ort(f32_dir / "unet" / "model.onnx"), export._ort(q_dir / "unet" / "model.onnx")
    d = [i for i in a.get_inputs() if i.name == "encoder_hidden_states"][0].shape[2]
    feed = {"sample": rng.standard_normal((1, 4, *hw), dtype=np.float32), "timestep": np.array(500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, d), dtype=np.float32)}
    ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]
    out["unet"] = {"max_abs_diff": float(np.abs(ya - yb).max()), "f32_std": float(ya.std())}
    a, b = export._ort(f32_dir / "text_encoder" / "model.onnx"), export._ort(q_dir / "text_encoder" / "model.onnx")
    ids = np.full((1, 77), 49407, dtype=np.int64)
    ids[0, :10] = [49406, 320, 736, 3240, 530, 518, 2583, 267, 14211, 49407]
    ya, yb = a.run(None, {"input_ids": ids})[0], b.run(None, {"input_ids": ids})[0]
    out["text_encoder"] = {"max_abs_diff": float(np.abs(ya - yb).max()), "f32_std": float(ya.std())}
    return out


MODES = {
    "weights": "weight-only int8: int8 weights with one f32 scale per output channel behind DequantizeLinear, "
               "f32 activations and products (tract: dequantized per call straight into its matrix-product panels)",
    "dynamic": "onnxruntime quantize_dynamic (MatMulInteger/ConvInteger + DynamicQuantizeLinear), int8 weights",
}


def quantize_folder(model: Path, out: Path, *, binding: dict[str, int] | None = None, per_channel: bool = False,
                    embeddings: bool = False, graphs=QUANTIZED_GRAPHS, verify_hw=(32, 32),
                    mode: str = "weights") -> dict:
    import export

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    src_manifest = json.loads((model / export.MANIFEST).read_text())
    details = {}
    for g in graphs:
        print(f"quantizing {g}")
        if mode == "weights":
            details[g] = quantize_graph_weights(model / g / "model.onnx", out / g / "model.onnx", binding=binding)
        else:
            details[g] = quantize_graph(model / g / "model.onnx", out / g / "model.onnx", binding=binding,
                                        per_channel=per_channel, embeddings=embeddings)
        print(f"  {details[g]}")
    diffs = compare(model, out, verify_hw) if not binding else {}
    for g, v in diffs.items():
        print(f"  {g}: int8 vs f32 max abs diff {v['max_abs_diff']:.3e} (f32 output std {v['f32_std']:.3e})")
    extra = {k: v for k, v in src_manifest.items() if k not in ("format", "precision", "files", "checked_resolutions",
                                                               "vae_scaling_factor", "text_hidden_size", "source")}
    extra["quantization"] = {
        "mode": mode,
        "method": MODES[mode],
        "per_channel": per_channel or mode == "weights",
        "graphs": list(graphs),
        "embeddings_quantized": embeddings,
        "bound_dims": binding or {},
        "details": details,
        "int8_vs_f32_max_abs_diff": {g: float(f"{v['max_abs_diff']:.3e}") for g, v in diffs.items()},
    }
    extra.pop("max_abs_diff_vs_torch", None)
    return export.write_manifest(out, "int8", src_manifest["checked_resolutions"], src_manifest["vae_scaling_factor"],
                                 src_manifest["text_hidden_size"], f"int8 of [{src_manifest['source']}]", extra)


def write_qdq_softmax_fixture(folder: Path) -> None:
    """A tiny QDQ graph: x (uint8) -> DequantizeLinear -> Softmax(axis=-1) -> QuantizeLinear ->
    DequantizeLinear -> y (f32). tract (0.23.9) folds DQ -> Softmax -> Q into an element-wise lookup
    table, so y becomes 255/256 everywhere instead of a distribution summing to ~1 per row. The
    expected output is onnxruntime's. A Rust test runs it in tract to notice when the fold changes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    shape = [1, 2, 4, 8]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero_point"], ["x_f"]),
        helper.make_node("Softmax", ["x_f"], ["p"], axis=-1),
        helper.make_node("QuantizeLinear", ["p", "p_scale", "p_zero_point"], ["p_q"]),
        helper.make_node("DequantizeLinear", ["p_q", "p_scale", "p_zero_point"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "x_zero_point"),
        numpy_helper.from_array(np.array(1.0 / 256.0, dtype=np.float32), "p_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.uint8), "p_zero_point"),
    ]
    graph = helper.make_graph(nodes, "qdq_softmax", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="diffusionx-onnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "qdq_softmax.onnx"))
    # deterministic inputs covering the range: dequantized values in [-6.4, 6.35]
    x = ((np.arange(np.prod(shape)) * 37 + 11) % 256).astype(np.uint8).reshape(shape)
    sess = ort.InferenceSession(str(folder / "qdq_softmax.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    np.save(folder / "qdq_softmax_input.npy", x)
    np.save(folder / "qdq_softmax_expected.npy", y.astype("<f4"))
    sums = y.sum(-1)
    assert np.all(np.abs(sums - 1.0) < 0.05), sums
    print(f"qdq_softmax fixture: row sums {sums.min():.3f}..{sums.max():.3f}, max {y.max():.4f}")


def parse_binding(s: str | None) -> dict[str, int] | None:
    if not s:
        return None
    return {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="f32 model folder written by export.py")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--mode", choices=sorted(MODES), default="weights",
                    help="weights (default): weight-only int8, f32 arithmetic; dynamic: int8 products with "
                         "activations quantized per call")
    ap.add_argument("--bind", help="concrete dims, e.g. batch_size=2,height=32,width=32,sequence_length=77")
    ap.add_argument("--per-channel", action="store_true", help="dynamic: per-channel weight scales (check tract first)")
    ap.add_argument("--quantize-embeddings", action="store_true", help="dynamic: also int8 the token embedding (Gather)")
    ap.add_argument("--graphs", nargs="+", default=list(QUANTIZED_GRAPHS), choices=["unet", "text_encoder"])
    args = ap.parse_args()
    m = quantize_folder(args.model, args.out, binding=parse_binding(args.bind), per_channel=args.per_channel,
                        embeddings=args.quantize_embeddings, graphs=args.graphs, mode=args.mode)
    print(json.dumps(m["quantization"]["int8_vs_f32_max_abs_diff"]))


if __name__ == "__main__":
    main()
