"""Build the real CLIP ViT-L/14 tokenizer (the one SD 1.x uses) offline.

The BPE merges ship inside the `open_clip_torch` wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`),
so no download is needed. From them we write the Hugging Face files:

- `tokenizer.json`: the fast-tokenizer JSON the Rust `tokenizers` crate loads. Padding
  (`<|endoftext|>`, id 49407, fixed length 77) and truncation (77, counting BOS/EOS) are stored
  in it, so `Tokenizer::encode(prompt, true)` returns exactly the 77 ids that diffusers'
  `StableDiffusionPipeline` feeds the text encoder
  (`tokenizer(p, padding="max_length", max_length=77, truncation=True)`).
- `tokenizer_config.json`, `special_tokens_map.json` (small, always written),
- `vocab.json`, `merges.txt` (1.6 MB; redundant with tokenizer.json; `--minimal` skips them).

Then it checks the ids for a set of prompts against transformers' CLIPTokenizer (fast; transformers 5
has no slow CLIP tokenizer any more), the raw `tokenizers.Tokenizer` read back from tokenizer.json,
and open_clip's SimpleTokenizer (OpenAI's original Python BPE, i.e. what transformers 4's slow
tokenizer implemented). open_clip pads with 0 instead of 49407, so it is compared up to the EOS.

    python onnx/make_tokenizer.py --out DIR [--minimal]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
# SD 1.x (openai/clip-vit-large-patch14 tokenizer) pads with <|endoftext|>; SD 2.x uses "!" (id 0).
PAD = EOS
PAD_ID = EOS_ID

# Prompts whose ids must agree across implementations.
CHECK_PROMPTS = [
    "a red fox in the snow, watercolor",
    "A RED FOX In The Snow, WaterColor",
    "blurry",
    "",
    "Café au lait, crème brûlée; naïve façade!",
    "photo of 3 cats, 1024x768, f/1.8, 50mm, 2023-11-25 at 12:30",
    "what's up? it'll be fine -- they're here... (really) [x] {y} <z> #tag @user $5 100%",
    "  multiple   spaces\tand\ttabs\nnewline  ",
    "emoji 🦊❄️ and CJK 狐狸 and Ελληνικά and русский",
    " ".join(["a very long prompt about a fox"] * 20),  # > 77 tokens: truncated
    "word " * 75,  # exactly 75 content tokens: fits with BOS/EOS
    "word " * 76,  # one too many
]

# Prompts where open_clip (ftfy.fix_text + html.unescape, like transformers 4's slow tokenizer)
# legitimately differs from the fast tokenizer that diffusers uses with transformers 5 (and that the
# Rust `tokenizers` crate implements): reported, not asserted.
KNOWN_SLOW_FAST_DIFFERENCES = [
    "fish &amp; chips",  # html.unescape in the slow path only
    "\u201ccurly quotes\u201d",  # ftfy uncurls quotes in the slow path only
    "\ufb01ne ligatures and full-width \uff21\uff22\uff23",  # ftfy unfolds these; NFC keeps them
]


def bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (same as open_clip's and transformers')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Exactly the construction in OpenAI's / open_clip's SimpleTokenizer."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == 49408, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(out: Path, minimal: bool = False) -> None:
    """Write the HF tokenizer folder into `out`."""
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_vocab_and_merges()
    merges_txt = ["#version: 0.2"] + [" ".join(m) for m in merges]
    # transformers' CLIPTokenizer (tokenizers backend) from vocab + merges.
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=MAX_LENGTH)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID
    tok.save_pretrained(str(out))
    # tokenizer.json written by the backend itself, with padding/truncation baked in.
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=MAX_LENGTH)
    backend.enable_padding(direction="right", pad_id=PAD_ID, pad_token=PAD, length=MAX_LENGTH)
    backend.save(str(out / "tokenizer.json"), pretty=False)
    backend.no_padding()
    backend.no_truncation()
    # Deterministic small config files (save_pretrained's may carry version-specific keys).
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if minimal:
        for name in ("vocab.json", "merges.txt"):
            (out / name).unlink(missing_ok=True)
    else:
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        (out / "merges.txt").write_text("\n".join(merges_txt) + "\n")
    # Anything else save_pretrained may have added (chat templates etc.) is not part of our layout.
    keep = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"}
    for p in out.iterdir():
        if p.name not in keep:
            p.unlink()


def diffusers_ids(tok, prompts: list[str]):
    """Token ids exactly as StableDiffusionPipeline.encode_prompt computes them."""
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids


def verify(folder: Path) -> None:
    """Assert the ids agree across implementations; raise on mismatch."""
    import numpy as np
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(folder))
    assert hf.model_max_length == MAX_LENGTH and hf.pad_token_id == PAD_ID
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    oc = SimpleTokenizer(context_length=MAX_LENGTH)

    def compare(prompt: str) -> tuple[bool, bool]:
        a = diffusers_ids(hf, [prompt])[0]
        enc = raw.encode(prompt)
        b = np.array(enc.ids)
        assert len(b) == MAX_LENGTH, f"tokenizer.json did not pad/truncate to {MAX_LENGTH}: {len(b)}"
        c = oc([prompt])[0].numpy()
        # open_clip pads with 0 after the EOS; compare through the first EOS.
        n = int(np.argmax(a == EOS_ID)) + 1
        assert a[0] == BOS_ID and a[n - 1] == EOS_ID and (a[n:] == PAD_ID).all()
        return bool((a == b).all()), bool((a[:n] == c[:n]).all() and (c[n:] == 0).all())

    for p in CHECK_PROMPTS:
        fast_ok, oc_ok = compare(p)
        if not (fast_ok and oc_ok):
            raise SystemExit(f"tokenizer mismatch for {p!r}: tokenizer.json==transformers {fast_ok}, open_clip {oc_ok}")
    for p in KNOWN_SLOW_FAST_DIFFERENCES:
        fast_ok, oc_ok = compare(p)
        assert fast_ok, p
        print(f"  known difference (open_clip/ftfy vs fast): {p!r}: equal={oc_ok}")
    ids = diffusers_ids(hf, CHECK_PROMPTS[:2])
    print(f"tokenizer ok: {len(CHECK_PROMPTS)} prompts agree (transformers fast, tokenizer.json, open_clip)")
    print(f"  {CHECK_PROMPTS[0]!r} -> {ids[0][:12].tolist()}...")


def write_id_fixture(folder: Path, out: Path) -> None:
    """The ids transformers gives (as diffusers calls it) for every check prompt, as JSON, so the
    Rust tokenizer is tested against them."""
    import json

    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(folder))
    prompts = CHECK_PROMPTS + KNOWN_SLOW_FAST_DIFFERENCES
    ids = diffusers_ids(hf, prompts)
    counts = [len(hf(p).input_ids) for p in prompts]  # untruncated, with BOS/EOS
    cases = [{"prompt": p, "ids": row.tolist(), "tokens": n} for p, row, n in zip(prompts, ids, counts)]
    out.write_text(json.dumps({"source": "transformers CLIPTokenizer, padding=max_length, max_length=77, "
                                         "truncation=True (StableDiffusionPipeline.encode_prompt)",
                               "cases": cases}, ensure_ascii=False, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="tokenizer folder to write")
    ap.add_argument("--minimal", action="store_true", help="skip vocab.json / merges.txt")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    write_tokenizer(args.out, minimal=args.minimal)
    verify(args.out)


if __name__ == "__main__":
    main()
