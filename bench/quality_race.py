"""The quality race, the twin of `make bench`: hy-edge's conversions and llama.cpp's quant types of the
bundled SmolLM2-135M-Instruct (Q4_1 GGUF), on the same text and token ids, against one unquantized
reference (hy-edge's fp32 conversion of that GGUF).

- hy-edge: one conversion per converter policy in HY_EDGE (QuantPolicy keyword arguments; a new storage
  kind is one more line there).
- llama.cpp (llama-cpp-python): its own quantizer makes an F32 GGUF from the bundled file, then each type
  in LLAMA_CPP_TYPES from that F32 file; the bundled Q4_1 file runs as it is. The F32 row checks that both
  runtimes see the same model and tokens (its KL against the reference should be ~0).
- The text (examples/eval/race.txt) is tokenized once by hy-edge's tokenizer; every model is fed those
  ids in teacher-forced windows of 512 (each window starts on the previous one's last token), all models
  loaded, window by window, so only one window's (T, V) logits per model exist at a time.

Per variant: perplexity ratio, mean / p99 KL(reference || variant) per token, top-1 agreement, MB read
per decode step, file size, and decode tok/s joined from the speed race's results
(bench/results/smollm2-<isa>.json, written by bench/smollm2.py; empty where that race has no such row).
Writes bench/results/quality-race.{md,json} and the charts quality-race-kl-bytes.png / -kl-speed.png.

    python bench/quality_race.py [--threads 1] [--text FILE] [--variants NAME,...] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import artifacts  # noqa: E402
import quality_metrics as qm  # noqa: E402
import quality_report  # noqa: E402
from eval_fp8 import chosen_variants, windows  # noqa: E402

OUT = HERE / "out" / "quality"
RESULTS = HERE / "results"
TEXT = ROOT / "examples" / "eval" / "race.txt"
WINDOW = 512


@dataclass(frozen=True)
class Variant:
    name: str
    runtime: str  # hy-edge | llama.cpp
    policy: tuple[tuple[str, object], ...] = ()  # hy-edge: QuantPolicy keyword arguments
    ftype: str | None = None  # llama.cpp: a LLAMA_FTYPE_* suffix, or None for the bundled file as it is
    speed: str | None = None  # its row name in bench/results/smollm2-<isa>.json
    source: str | None = None  # hy-edge: convert llama.cpp's file of this type instead of the bundled one

    @property
    def policy_kwargs(self) -> dict:
        return dict(self.policy)


def hy_edge(name: str, speed: str | None = None, source: str | None = None, **policy) -> Variant:
    return Variant(name, "hy-edge", tuple(sorted(policy.items())), speed=speed, source=source)


REFERENCE = hy_edge("fp32 reference", format="none")
# hy-edge's conversions raced; QuantPolicy() defaults fill in the rest, so "default" follows the converter.
# speed: the row names bench/smollm2.py gives these conversions.
NEAREST = {"rounding": "nearest", "scales": "amax"}  # round-to-nearest from amax, the default before
HY_EDGE = (
    hy_edge("hy-edge default (source: GGUF blocks kept)", speed="hy-edge"),
    hy_edge("hy-edge --format e4m3 --rounding nearest", speed="hy-edge e4m3", format="e4m3", **NEAREST),
    hy_edge("hy-edge --format e4m3 --rounding nearest --lm-head-fp16", format="e4m3", lm_head_fp8=False, **NEAREST),
    hy_edge(
        "hy-edge --format e4m3 --rounding nearest block:32",
        speed="hy-edge e4m3 block:32",
        format="e4m3",
        granularity="block:32",
        **NEAREST,
    ),
    hy_edge(
        "hy-edge --format e4m3 --rounding nearest block:32 --lm-head-fp16",
        format="e4m3",
        granularity="block:32",
        lm_head_fp8=False,
        **NEAREST,
    ),
    # the converter's default rounding of float weights: gptq with searched scales (--rounding auto)
    hy_edge("hy-edge --format e4m3 (gptq+search)", format="e4m3"),
    hy_edge("hy-edge --format e4m3 (gptq+search) --lm-head-fp16", format="e4m3", lm_head_fp8=False),
    hy_edge("hy-edge --format e4m3 (gptq+search) block:128", format="e4m3", granularity="block:128"),
    hy_edge("hy-edge --format e4m3 (gptq+search) block:64", format="e4m3", granularity="block:64"),
    hy_edge("hy-edge --format e4m3 (gptq+search) block:32", format="e4m3", granularity="block:32"),
    hy_edge(
        "hy-edge --format e4m3 (gptq+search) block:32 --lm-head-fp16",
        format="e4m3",
        granularity="block:32",
        lm_head_fp8=False,
    ),
    # below eight bits (gptq+search, a half scale per block of 32); --bits: each linear's format by measured
    # sensitivity under that many bits per weight
    hy_edge("hy-edge --format e2m1 (FP4)", speed="hy-edge FP4 e2m1", format="e2m1"),
    hy_edge("hy-edge --format auto --bits 4.8", format="auto", bits=4.8),
    hy_edge("hy-edge --format auto --bits 5.5", speed="hy-edge auto 5.5 bits", format="auto", bits=5.5),
    hy_edge("hy-edge --format auto --bits 6.1", format="auto", bits=6.1),  # Q4_K_M's MB per token
    hy_edge("hy-edge --format e2m3 (FP6)", speed="hy-edge FP6 e2m3", format="e2m3"),
    hy_edge("hy-edge --format e3m2 (FP6)", format="e3m2"),
    # the same, each linear's input rounded to int8 per block of 32 (integer dots, as llama.cpp's Q8 inputs)
    hy_edge(
        "hy-edge --format e2m1 (FP4) --activations q8",
        speed="hy-edge FP4 e2m1, q8 inputs",
        format="e2m1",
        activations="q8",
    ),
    hy_edge(
        "hy-edge --format e2m3 (FP6) --activations q8",
        speed="hy-edge FP6 e2m3, q8 inputs",
        format="e2m3",
        activations="q8",
    ),
    hy_edge("hy-edge --format auto --bits 6.1 --activations q8", format="auto", bits=6.1, activations="q8"),
    # llama.cpp's K-quant files (made by its quantizer, as the llama.cpp rows below) converted by default:
    # their blocks kept, so each should match llama.cpp running the same file
    *(
        hy_edge(f"hy-edge on llama.cpp's {t} file (blocks kept)", speed=f"hy-edge {t} kept", source=t)
        for t in ("Q6_K", "Q5_K_M", "Q4_K_M")
    ),
)
LLAMA_CPP_TYPES = ("F32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")  # made from the F32 file
LLAMA_CPP = (
    Variant("llama.cpp Q4_1 (bundled file)", "llama.cpp", speed="llama.cpp Q4_1 (the bundled file)"),
    *(Variant(f"llama.cpp {t}", "llama.cpp", ftype=t, speed=f"llama.cpp {t}") for t in LLAMA_CPP_TYPES),
)
VARIANTS = (*HY_EDGE, *LLAMA_CPP)


def log(msg: str) -> None:
    print(f"[quality_race] {msg}", file=sys.stderr, flush=True)


# -- model files, built once into bench/out/quality ---------------------------------------------------
def _converter_digest() -> str:
    """A digest of the converter's sources: a converter that changed converts again."""
    import hy_edge_convert

    h = hashlib.sha1()
    for f in sorted(Path(hy_edge_convert.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def hy_edge_model(src: Path, v: Variant) -> Path:
    """The conversion of `src` under QuantPolicy(**v.policy), cached under a name hashed from the full
    policy (defaults included), the source and the converter's sources, so a changed converter (or its
    defaults) converts again."""
    from hy_edge_convert import QuantPolicy, convert

    policy = QuantPolicy(**v.policy_kwargs)
    stamp = json.dumps(
        {"policy": dataclasses.asdict(policy), "source": str(src), "converter": _converter_digest()}, sort_keys=True
    )
    path = OUT / f"{src.name.split('.')[0].lower()}.{hashlib.sha1(stamp.encode()).hexdigest()[:10]}.onnx"
    data = path.with_name(path.name + ".data")
    if path.exists() and data.exists() and path.stat().st_mtime >= src.stat().st_mtime:
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    convert(src, path, policy)  # writes to a temporary name and renames when complete
    path.with_name(path.name + ".policy.json").write_text(stamp + "\n")  # what the hashed name stands for
    log(f"{v.name}: converted in {time.perf_counter() - t0:.0f} s -> {path.name}")
    return path


def llama_cpp_model(src: Path, v: Variant) -> Path:
    if v.ftype is None:
        return src
    stem = src.name.split(".")[0].lower()
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = artifacts.llama_cpp_quantize(src, OUT / f"{stem}.f32.gguf", "F32")
    if v.ftype == "F32":
        return f32
    return artifacts.llama_cpp_quantize(f32, OUT / f"{stem}.{v.ftype.lower()}.gguf", v.ftype)


# -- runners: (T,) token ids in, (T, V) float32 logits out, from a fresh cache ------------------------
class HyEdgeRunner:
    def __init__(self, path: Path, threads: int | None, window: int = WINDOW):
        import edge_runtime

        self.model = edge_runtime.load(path, threads=threads)
        self.session = self.model.session(max_context=window)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.session.reset()
        return self.session.forward(ids, all_logits=True)


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int | None, window: int = WINDOW):
        import llama_cpp

        n = threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
            n_threads=n, n_threads_batch=n, verbose=False,
        )  # fmt: skip

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return np.array(self.llm.scores[: len(ids)], np.float32)  # a copy: the buffer is reused


# -- the race -----------------------------------------------------------------------------------------
def race(ids: np.ndarray, ref, runners: dict, window: int = WINDOW) -> tuple[qm.Tally, dict[str, qm.Tally]]:
    """Every runner on every window of `ids`; per-token figures against `ref`'s."""
    ref_tally, tallies = qm.Tally(), {name: qm.Tally() for name in runners}
    spans = windows(len(ids), window)
    t0 = time.perf_counter()
    for i, (s, e) in enumerate(spans, 1):
        chunk, targets = ids[s:e], ids[s + 1 : e]
        ref_lp = qm.log_probs(ref.logits(chunk)[:-1])  # row t predicts token t+1
        ref_tally.add(ref_lp, targets, ref_lp)
        for name, runner in runners.items():
            tallies[name].add(qm.log_probs(runner.logits(chunk)[:-1]), targets, ref_lp)
        left = (time.perf_counter() - t0) / i * (len(spans) - i)
        log(f"window {i}/{len(spans)} done, ~{left / 60:.1f} min left")
    return ref_tally, tallies


def save_tallies(path: Path, ref: qm.Tally, tallies: dict[str, qm.Tally]) -> None:
    """The per-token figures (nll, argmax, KL) of every variant, for a closer look after the run."""
    arrays = {}
    for name, t in {REFERENCE.name: ref, **tallies}.items():
        for key in ("nll", "argmax", "kl"):
            arrays[f"{name}/{key}"] = np.concatenate(getattr(t, key))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def speed_row_names(doc: dict) -> dict[str, str]:
    """{row name in `doc`: the name bench/smollm2.py gives that conversion today}. Records from before the
    converter kept GGUF blocks by default (no "hy_edge_default_format", no "hy-edge e4m3" row) called the
    E4M3 conversions "hy-edge" and "hy-edge block:32": those rows are E4M3, never the new default."""
    runs = doc["runs"]
    if doc.get("hy_edge_default_format", "source" if "hy-edge e4m3" in runs else "e4m3") != "e4m3":
        return {name: name for name in runs}
    return {name: name.replace("hy-edge", "hy-edge e4m3", 1) if name.startswith("hy-edge") else name for name in runs}


def renamed_speed_rows(results: Path = RESULTS) -> dict[str, dict[str, str]]:
    """{isa: {row name in smollm2-<isa>.json: the name it is joined under}} for the rows speed_row_names
    renames (records from before --format source), so the table can say which measurement it shows."""
    out = {}
    for f in sorted(results.glob("smollm2-*.json")):
        try:
            doc = json.loads(f.read_text())
            renamed = {a: b for a, b in speed_row_names(doc).items() if a != b}
        except (ValueError, KeyError, TypeError):
            continue
        if renamed:
            out[doc["isa"]] = renamed
    return out


def decode_speeds(results: Path = RESULTS) -> dict[str, dict[str, float]]:
    """{isa: {speed-race row name: median decode tok/s}} from bench/results/smollm2-<isa>.json."""
    out = {}
    for f in sorted(results.glob("smollm2-*.json")):
        try:
            doc = json.loads(f.read_text())
            names = speed_row_names(doc)
            out[doc["isa"]] = {
                names[name]: statistics.median(r["decode_tps"] for r in runs) for name, runs in doc["runs"].items()
            }
        except (ValueError, KeyError, TypeError):
            log(f"{f.name}: not a speed-race result, skipped")
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_cpp_build() -> tuple[str, str]:
    """(the build: version, location and ggml's feature list; the widest x86 vector ISA it uses)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode().strip()
    on = {f.split("=")[0].strip() for f in info.removeprefix("CPU :").split("|") if f.strip().endswith("= 1")}
    isa = next((name.lower() for name in ("AVX512", "AVX2") if name in on), "generic")
    return f"llama-cpp-python {llama_cpp.__version__} ({llama_cpp.__file__}): {info}", isa


def rejoin_speeds(results: Path, speed_isa: str) -> None:
    """The recorded quality-race.json with its decode tok/s taken again from the speed race's results."""
    path = results / "quality-race.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"quality_race: no recorded run to join speeds to: {path}: {e}")
    speeds, by_name = decode_speeds(), {v.name: v for v in VARIANTS}
    for row in doc["rows"]:
        v = by_name.get(row["variant"])
        row["decode_tps"] = {isa: figs[v.speed] for isa, figs in speeds.items() if v and v.speed in figs}
    doc["speed_results"] = {isa: f"bench/results/smollm2-{isa}.json" for isa in speeds}
    doc["speed_rows_renamed"] = renamed_speed_rows()
    md = quality_report.markdown(doc)
    print(md)
    quality_report.write(doc, md, results, speed_isa)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per runtime (default 1: the figures do not depend on it, and on a busy machine one "
        "thread per runtime is faster than two waiting on each other at every barrier)",
    )
    ap.add_argument("--text", type=Path, default=TEXT, help="the evaluation text (default: examples/eval/race.txt)")
    ap.add_argument("--max-tokens", type=int, help="evaluate only the text's first N tokens (a quick look)")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    ap.add_argument("--results", type=Path, default=RESULTS, help="where quality-race.{md,json,png} go")
    ap.add_argument("--speed-isa", default="avx2", help="the speed race whose decode tok/s the chart uses")
    ap.add_argument(
        "--add",
        action="store_true",
        help="merge the raced --variants into the recorded run (same text and reference) instead of replacing it",
    )
    ap.add_argument(
        "--speeds-only",
        action="store_true",
        help="race nothing: join the speed race's latest results (bench/smollm2.py) to the recorded quality run",
    )
    args = ap.parse_args(argv)
    if args.speeds_only:
        return rejoin_speeds(args.results, args.speed_isa)
    variants = chosen_variants(ap, VARIANTS, args.variants)
    if not args.text.is_file():
        ap.error(f"--text: {args.text} is not a file")

    from edge_runtime.cli.model import default_gguf

    src = Path(default_gguf()).resolve()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        log("llama-cpp-python is not installed (make install-bench): racing hy-edge's variants only")
        variants = [v for v in variants if v.runtime != "llama.cpp" and v.source is None]
    start = time.perf_counter()
    paths = {REFERENCE.name: hy_edge_model(src, REFERENCE)}
    for v in variants:
        if v.runtime == "llama.cpp":
            paths[v.name] = llama_cpp_model(src, v)
        else:  # a llama.cpp-made source needs llama.cpp's quantizer (or its file, made before)
            source = src if v.source is None else llama_cpp_model(src, Variant(v.source, "llama.cpp", ftype=v.source))
            paths[v.name] = hy_edge_model(source, v)
    ref = HyEdgeRunner(paths[REFERENCE.name], args.threads)
    ids = np.asarray(ref.model.tokenizer.encode(args.text.read_text(), add_special_tokens=True), np.int64)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    runners = {
        v.name: (HyEdgeRunner if v.runtime == "hy-edge" else LlamaCppRunner)(paths[v.name], args.threads)
        for v in variants
    }
    log(f"{len(ids)} tokens, {len(runners)} variants + the reference")
    ref_tally, tallies = race(ids, ref, runners)
    save_tallies(OUT / "tallies.npz", ref_tally, tallies)
    speeds = decode_speeds()
    rows = []
    for v in variants:
        path = paths[v.name]
        per_token = qm.onnx_bytes_per_token(path) if v.runtime == "hy-edge" else qm.gguf_bytes_per_token(path)
        rows.append({
            "variant": v.name, "runtime": v.runtime, "file": path.name,
            "policy": v.policy_kwargs if v.runtime == "hy-edge" else None,
            "llama_cpp_type": (v.ftype or "Q4_1 (bundled)") if v.runtime == "llama.cpp" else None,
            "mb_per_token": per_token / 1e6, "file_mb": qm.file_bytes(path) / 1e6,
            **tallies[v.name].summary(ref_tally),
            "decode_tps": {isa: figs[v.speed] for isa, figs in speeds.items() if v.speed in figs},
        })  # fmt: skip
    ref_row = ref_tally.summary(ref_tally)
    from hy_edge_ops.isa import ISA

    build, llama_isa = llama_cpp_build() if any(v.runtime == "llama.cpp" for v in variants) else (None, None)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC",
        "cpu": cpu_name(),
        "isa": {"hy-edge": ISA, **({"llama.cpp": llama_isa} if llama_isa else {})},  # the kernels' vector ISA
        "model": src.name,
        "text": str(args.text.resolve().relative_to(ROOT) if args.text.resolve().is_relative_to(ROOT) else args.text),
        "text_tokens": int(len(ids)),
        "predicted_tokens": ref_row["tokens"],
        "window": WINDOW,
        "threads": args.threads,
        "reference": {
            "variant": REFERENCE.name,
            "policy": REFERENCE.policy_kwargs,
            "perplexity": ref_row["perplexity"],
            "mb_per_token": qm.onnx_bytes_per_token(paths[REFERENCE.name]) / 1e6,
        },  # fmt: skip
        "llama_cpp_build": build,
        "speed_results": {isa: f"bench/results/smollm2-{isa}.json" for isa in speeds},
        "speed_rows_renamed": renamed_speed_rows(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    if args.add:
        doc = merged(args.results / "quality-race.json", doc)
    md = quality_report.markdown(doc)
    print(md)
    quality_report.write(doc, md, args.results, args.speed_isa)
    log(f"done in {doc['seconds'] / 60:.1f} min -> {args.results}/quality-race.*")


def merged(path: Path, new: dict) -> dict:
    """The recorded run with `new`'s rows added (or replaced, by variant name), when both raced the same
    text against the same reference; the run of the added rows is listed under "added"."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"quality_race: --add: no recorded run to add to: {path}: {e}")
    same = ("model", "text", "text_tokens", "predicted_tokens", "window")
    if any(old.get(k) != new[k] for k in same) or old["reference"]["perplexity"] != new["reference"]["perplexity"]:
        sys.exit("quality_race: --add: the recorded run raced another text, model or reference; race everything")
    names = [r["variant"] for r in new["rows"]]
    rows = [r for r in old["rows"] if r["variant"] not in names]
    order = [v.name for v in VARIANTS]
    rows = sorted([*rows, *new["rows"]], key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)
    added = [*old.get("added", []), {"date": new["date"], "cpu": new["cpu"], "isa": new["isa"], "variants": names}]
    return {**old, "rows": rows, "added": added, "seconds": old["seconds"] + new["seconds"]}


if __name__ == "__main__":
    main()
