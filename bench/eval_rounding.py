"""How faithful each eight-bit rounding is on the real default model: SmolLM2-135M-Instruct's conversions under
the converter's roundings (nearest, gptq), scales (amax, search), granularities and head choices, each
against the unquantized (fp32) conversion on examples/eval/text.txt (never the calibration text).

Per variant: perplexity ratio to fp32, mean and 99th-percentile KL(fp32 || variant) per predicted token,
top-1 agreement with fp32's argmax (teacher-forced, windows of 512 tokens as bench/eval_fp8.py), the bytes
of weights read per decoded token, and the conversion's wall time.

Usage: python bench/eval_rounding.py [--out-dir bench/out/rounding] [--variants "a; b"] [--markdown]
Conversions are cached in --out-dir under a name derived from the whole policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fp8 import EVAL_DIR, WINDOW, smollm2_gguf_path, windows  # noqa: E402

HEAD16 = {"lm_head_fp8": False}
E4M3 = {"format": "e4m3"}  # re-quantize the GGUF's values, whatever the converter's default for a GGUF is
VARIANTS = {
    "fp32": {"format": "none"},
    "nearest/channel": {"rounding": "nearest", "scales": "amax"},
    "nearest/channel + fp16 head": {"rounding": "nearest", "scales": "amax", **HEAD16},
    "nearest/channel, scale search": {"rounding": "nearest", "scales": "search"},
    "gptq/channel": {"rounding": "gptq", "scales": "amax"},
    "gptq/channel, scale search": {"rounding": "gptq", "scales": "search"},
    "gptq/channel, scale search + fp16 head": {"rounding": "gptq", "scales": "search", **HEAD16},
    "nearest/block:32": {"granularity": "block:32", "rounding": "nearest", "scales": "amax"},
    "nearest/block:32 + fp16 head": {"granularity": "block:32", "rounding": "nearest", "scales": "amax", **HEAD16},
    "gptq/block:32, scale search": {"granularity": "block:32", "rounding": "gptq", "scales": "search"},
    "gptq/block:32, scale search + fp16 head": {
        "granularity": "block:32",
        "rounding": "gptq",
        "scales": "search",
        **HEAD16,
    },
}


def log(msg: str) -> None:
    print(f"[eval_rounding] {msg}", file=sys.stderr, flush=True)


def converted(src: Path, out_dir: Path, fields: dict) -> tuple[Path, float | None]:
    """The conversion of src under QuantPolicy(**fields), cached by the full policy; (path, seconds or
    None when cached)."""
    from hy_edge_convert import QuantPolicy, convert

    fields = fields if fields.get("format") == "none" else {**E4M3, **fields}
    stamp = json.dumps(dataclasses.asdict(QuantPolicy(**fields)), sort_keys=True)
    path = out_dir / f"smollm2-{hashlib.sha256((stamp + str(src)).encode()).hexdigest()[:12]}.onnx"
    if path.is_file() and Path(str(path) + ".data").is_file():
        return path, None
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    convert(src, path, QuantPolicy(**fields))
    return path, time.perf_counter() - t0


def log_probs(path: Path, ids: np.ndarray) -> np.ndarray:
    """log-softmax (N, V) float32 at each predicted position of `ids` (teacher-forced windows)."""
    import edge_runtime

    model = edge_runtime.load(path, backend="numba")
    sess = model.session(max_context=WINDOW)
    out = []
    for s, e in windows(len(ids), WINDOW):
        sess.reset()
        x = sess.forward(ids[s:e], all_logits=True)[:-1].astype(np.float64)  # (T-1, V)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        out.append(x.astype(np.float32))
    return np.concatenate(out)


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decoded token reads: every stored linear and the head with their scales, from the
    file's own tensor table (not the data file's size, which holds alignment padding); the embedding only
    when it is the head (a tied model without its own head copy), since decode gathers one row of it."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    sizes = {
        t.name: int({e.key: e.value for e in t.external_data}.get("length", 0)) or len(t.raw_data)
        for t in proto.graph.initializer
        if not t.name.startswith("/")  # graph constants (the RoPE table)
    }
    head_is_embedding = not any(n.startswith("lm_head.weight") for n in sizes)
    return sum(n for name, n in sizes.items() if head_is_embedding or not name.startswith("model.embed_tokens."))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "rounding")
    ap.add_argument("--variants", help="semicolon-separated subset of: " + "; ".join(VARIANTS))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = list(VARIANTS)
    if args.variants:
        names = ["fp32"] + [n.strip() for n in args.variants.split(";") if n.strip() and n.strip() != "fp32"]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)}")
    src = smollm2_gguf_path().resolve()
    import edge_runtime

    text = (EVAL_DIR / "text.txt").read_text()
    rows, ref = [], None
    for name in names:
        path, seconds = converted(src, args.out_dir, VARIANTS[name])
        log(f"{name}: {'cached' if seconds is None else f'converted in {seconds:.1f} s'} {path.name}")
        if ref is None:
            ids = np.asarray(edge_runtime.load(path).tokenizer.encode(text, add_special_tokens=True), np.int64)
            targets = np.concatenate([ids[s + 1 : e] for s, e in windows(len(ids), WINDOW)])
        lp, nbytes = log_probs(path, ids), bytes_per_token(path)
        if ref is None:
            ref = lp
        nll, ref_nll = -lp[np.arange(len(targets)), targets], -ref[np.arange(len(targets)), targets]
        kl = (np.exp(ref.astype(np.float64)) * (ref.astype(np.float64) - lp)).sum(axis=1)
        rows.append(
            {
                "variant": name,
                "MB/token": nbytes / 1e6,
                "ppl_ratio": float(np.exp(nll.mean() - ref_nll.mean())),
                "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)),
                "top1": float(np.mean(lp.argmax(axis=1) == ref.argmax(axis=1))),
                "convert_s": seconds,
                "tokens": int(len(targets)),
            }
        )
        log(json.dumps(rows[-1]))
    head = ["variant", "MB/token", "PPL ratio", "mean KL", "p99 KL", "top-1 agree", "convert s"]
    lines = [head] + [
        [
            r["variant"],
            f"{r['MB/token']:.1f}",
            f"{r['ppl_ratio']:.4f}",
            f"{r['kl_mean']:.4f}",
            f"{r['kl_p99']:.4f}",
            f"{r['top1']:.2%}",
            "cached" if r["convert_s"] is None else f"{r['convert_s']:.1f}",
        ]
        for r in rows
    ]
    print(f"model {src.name}, {rows[0]['tokens']} predicted tokens of {EVAL_DIR.name}/text.txt, windows of {WINDOW}")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))
        print("\n".join("| " + " | ".join(r) + " |" for r in lines[1:]))
    else:
        w = [max(len(r[i]) for r in lines) for i in range(len(head))]
        print("\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
