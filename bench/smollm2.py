"""hy-edge against llama.cpp on the bundled SmolLM2-135M-Instruct, where small matrices (576 hidden,
30 layers) make per-call overhead matter: decode tok/s and TTFT of a 128-token prompt, each runtime in
a fresh process, interleaved, `--rounds` rounds, median (min-max).

llama.cpp runs the bundled Q4_1 GGUF as it is and a Q8_0 requantization of it (llama.cpp's own quantizer
through llama-cpp-python); hy-edge the default conversion (the one `make run` uses: the file's Q4_1 and
Q8_0 blocks kept exactly), its E4M3 requantization (`--format e4m3`, the default before) and, with
--granularity, E4M3 conversions with other scale layouts (e.g. block:32, against per-channel).
--isa avx2 on an AVX-512 host compiles hy-edge's kernels for AVX2 and runs llama.cpp's AVX2 build (as
make bench ISA=avx2). The raw runs go to bench/results/smollm2-<isa>.json.

    python bench/smollm2.py [--rounds 3] [--threads 2] [--decode-tokens 128] [--isa native|avx2]
                            [--granularity block:32] [--subbyte] [--kquants]

--kquants races llama.cpp's Q4_K_M, Q5_K_M and Q6_K files (its quantizer, from its F32 requantization of the
bundled file) against hy-edge's default conversion of each file (their blocks kept: `hy-edge Q4_K_M kept` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
PROMPT = 128


def _gguf() -> Path:
    from edge_runtime.cli.model import default_gguf

    return Path(default_gguf())


def _q8_0(src: Path) -> Path:
    """llama.cpp's Q8_0 requantization of the bundled GGUF, made once under bench/out."""
    import ctypes

    import llama_cpp

    dst = OUT / "smollm2-135m-instruct.q8_0.gguf"
    if not dst.exists():
        OUT.mkdir(exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            sys.exit("smollm2: llama.cpp could not requantize the GGUF to Q8_0")
        os.replace(tmp, dst)
    return dst


def _hy_edge_model(src: Path, granularity: str | None = None) -> Path:
    """The default conversion (as `make run` makes it), or one with another scale granularity (bench/out)."""
    if granularity is None:
        from edge_runtime.cli.model import resolve_model

        return Path(resolve_model(None, notice=lambda m: print(m, file=sys.stderr)))
    from hy_edge_convert import QuantPolicy, convert

    dst = OUT / f"smollm2-135m-instruct.e4m3-{granularity.replace(':', '')}.onnx"
    if not dst.exists():
        OUT.mkdir(exist_ok=True)
        # round-to-nearest: the speed depends on the bytes only, and this conversion takes seconds
        convert(src, dst, QuantPolicy(format="e4m3", granularity=granularity, rounding="nearest", scales="amax"))
    return dst


# --subbyte: hy-edge below eight bits (row name -> QuantPolicy fields) and llama.cpp's types made from its F32
# requantization of the bundled file (bench/quality_race.py makes the same files)
SUBBYTE = {
    "hy-edge FP4 e2m1": {"format": "e2m1"},
    "hy-edge auto 5.5 bits": {"format": "auto", "bits": 5.5},
    "hy-edge FP6 e2m3": {"format": "e2m3"},
    "hy-edge FP4 e2m1, q8 inputs": {"format": "e2m1", "activations": "q8"},
    "hy-edge FP6 e2m3, q8 inputs": {"format": "e2m3", "activations": "q8"},
}
LLAMA_CPP_TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")


def _subbyte_model(src: Path, name: str) -> Path:
    from hy_edge_convert import QuantPolicy, convert

    stem = name.split(" ", 1)[1].replace(",", "").replace(" ", "-").replace(".", "")
    dst = OUT / f"smollm2-135m-instruct.{stem}.onnx"
    if not dst.exists():
        OUT.mkdir(exist_ok=True)
        convert(src, dst, QuantPolicy(**SUBBYTE[name]))
    return dst


KQUANT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")


def _kept_model(gguf: Path) -> Path:
    """hy-edge's default conversion of one of llama.cpp's files: its blocks kept."""
    from hy_edge_convert import QuantPolicy, convert

    dst = gguf.with_name(gguf.name.replace(".gguf", "-kept.onnx"))
    if not dst.exists() or dst.stat().st_mtime < gguf.stat().st_mtime:
        convert(gguf, dst, QuantPolicy())
    return dst


def child(runtime: str, path: str, threads: int, decode_tokens: int) -> dict:
    """One measurement in this (fresh) process: TTFT of a 128-token prompt, then greedy decode."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, PROMPT).astype(np.int64)
    if runtime == "hy-edge":
        import edge_runtime

        session = edge_runtime.load(path, threads=threads, max_context=1024).session()

        def prefill(x):
            session.reset()
            return int(np.argmax(session.forward(x)))

        def step(t):
            return int(np.argmax(session.forward(np.array([t], np.int64))))

    else:
        import llama_cpp

        llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)

        def prefill(x):
            llm.reset()
            llm.eval(x.tolist())
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

        def step(t):
            llm.eval([t])
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    step(prefill(ids[:8]))  # warm
    t0 = time.perf_counter()
    tok = prefill(ids)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        tok = step(tok)
    decode = decode_tokens / (time.perf_counter() - t0)
    from edge_runtime.engine.memory import peak_rss_mb

    return {"ttft128_s": ttft, "decode_tps": decode, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--isa", default="native", help="native, or avx2 on an AVX-512 host")
    ap.add_argument("--granularity", action="append", default=[], help="also hy-edge with this granularity")
    ap.add_argument("--subbyte", action="store_true", help="also hy-edge's FP4/FP6 rows and llama.cpp Q4_0..Q6_K")
    ap.add_argument("--kquants", action="store_true", help="also llama.cpp's K-quant files, and hy-edge on each")
    ap.add_argument("--child", nargs=2, metavar=("RUNTIME", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads, args.decode_tokens)))
        return
    if args.rounds < 1 or args.threads < 1 or args.decode_tokens < 1:
        sys.exit("smollm2: --rounds, --threads and --decode-tokens must be >= 1")
    sys.path.insert(0, str(HERE))
    import artifacts
    from hy_edge_ops import isa as isa_mod

    isa = isa_mod.ISA if args.isa == "native" else args.isa
    try:
        numba_env = isa_mod.codegen_env(isa)
        site = artifacts.llama_cpp_site(isa)
    except (ValueError, artifacts.ArtifactError) as e:
        sys.exit(f"smollm2: --isa: {e}")
    llama_env = {"PYTHONPATH": str(site)} if site else {}
    src = _gguf()
    paths = {
        "hy-edge": _hy_edge_model(src),
        "hy-edge e4m3": _hy_edge_model(src, "channel"),
        "llama.cpp Q4_1 (the bundled file)": src,
        "llama.cpp Q8_0": _q8_0(src),
    }
    for g in args.granularity:
        paths[f"hy-edge e4m3 {g}"] = _hy_edge_model(src, g)
    if args.subbyte:
        for name in SUBBYTE:
            paths[name] = _subbyte_model(src, name)
    if args.subbyte or args.kquants:
        f32 = artifacts.llama_cpp_quantize(src, OUT / "smollm2-135m-instruct.f32.gguf", "F32")
        for t in (*(LLAMA_CPP_TYPES if args.subbyte else ()), *(KQUANT_TYPES if args.kquants else ())):
            paths[f"llama.cpp {t}"] = artifacts.llama_cpp_quantize(
                f32, OUT / f"smollm2-135m-instruct.{t.lower()}.gguf", t
            )
            if args.kquants and t in KQUANT_TYPES:
                paths[f"hy-edge {t} kept"] = _kept_model(paths[f"llama.cpp {t}"])
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, path in paths.items():
            runtime = "llama.cpp" if name.startswith("llama.cpp") else "hy-edge"
            cmd = [sys.executable, __file__, "--child", runtime, str(path), "--threads", str(args.threads)]
            cmd += ["--decode-tokens", str(args.decode_tokens)]
            env = {**os.environ, **(llama_env if runtime == "llama.cpp" else numba_env)}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)
    from hy_edge_convert import QuantPolicy

    # which conversion the "hy-edge" row is (bench/quality_race.py joins its decode speed by that)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "isa": isa, "host_isa": isa_mod.ISA, "threads": args.threads,
              "rounds": args.rounds, "decode_tokens": args.decode_tokens,
              "hy_edge_default_format": QuantPolicy().format, "runs": runs}  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"smollm2-{isa}.json").write_text(json.dumps(record, indent=1) + "\n")

    def med(name, key):
        vals = [x[key] for x in runs[name]]
        return statistics.median(vals), min(vals), max(vals)

    print(
        f"\nSmolLM2-135M-Instruct, {isa}, {args.threads} threads, {args.rounds} interleaved rounds, median (min-max)\n"
    )
    print("| runtime | decode tok/s | TTFT 128 (s) | peak RSS (MB) |\n|---|---|---|---|")
    for name in paths:
        d, t, m = med(name, "decode_tps"), med(name, "ttft128_s"), med(name, "peak_rss_mb")
        print(f"| {name} | {d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | {t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f}) | {m[0]:.0f} |")
    for ll in (n for n in paths if n.startswith("llama.cpp")):
        for hy in (n for n in paths if n.startswith("hy-edge")):
            print(
                f"\n{hy} / {ll}: decode {med(hy, 'decode_tps')[0] / med(ll, 'decode_tps')[0]:.2f}x, "
                f"TTFT {med(hy, 'ttft128_s')[0] / med(ll, 'ttft128_s')[0]:.2f}x, "
                f"RSS {med(hy, 'peak_rss_mb')[0] / med(ll, 'peak_rss_mb')[0]:.2f}x"
            )


if __name__ == "__main__":
    main()
