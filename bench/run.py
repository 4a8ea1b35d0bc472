"""`make bench`: speed and memory on the full Hunyuan-0.5B shapes (deterministic random weights), both
backends measured in one run, then the FP8 quality evaluation on the bundled SmolLM2.

For each backend, in its own process (so peak RSS is its own): TTFT of a 128-token prompt (pp128),
decode speed over 64 tokens (tg64), mean ± sd over repeats, peak RSS, and the GB/s decode achieves
(bytes of weights read per token × tok/s) against the machine's measured read bandwidth.

    python bench/run.py [--threads 2] [--repeats 3] [--skip-eval] [--json bench/out/results.json]
    python bench/run.py --model FILE.onnx --skip-eval    # the same measurements on any converted file
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
PROMPT_TOKENS, DECODE_TOKENS = 128, 64


def ensure_model(fmt: str = "e4m3") -> Path:
    """The random 0.5B checkpoint and its conversion, built once into bench/out."""
    ckpt = OUT / "hunyuan-0.5b-random"
    if not (ckpt / "model.safetensors").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_hunyuan.py"), str(ckpt)], check=True)
    model = OUT / f"hunyuan-0.5b-random.{fmt}.onnx"
    if not model.exists():
        from hy_edge_convert import QuantPolicy, convert

        report = convert(ckpt, model, QuantPolicy(format=fmt))
        print(
            f"converted {ckpt.name} -> {model.name}: {(report.onnx_bytes + report.data_bytes) / 1e6:.0f} MB "
            f"in {report.seconds:.1f} s",
            file=sys.stderr,
        )
    return model


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth with the same threading as the kernels: a parallel sum over 512 MB."""
    import numba

    numba.set_num_threads(threads)

    @numba.njit(parallel=True, fastmath=True, cache=False)  # fastmath: a vectorised reduction
    def _sum(a):
        s = 0.0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    a = np.ones(128 * 1024 * 1024, np.float32)  # 512 MB
    _sum(a[:1024])
    best = min(_timed(lambda: _sum(a)) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model_path: str, backend: str, threads: int, repeats: int) -> dict:
    """Runs in a child process: pp128 / tg64 on one backend."""
    import edge_runtime
    from edge_runtime.memory import peak_rss_mb

    model = edge_runtime.load(model_path, backend=backend, threads=threads, max_context=1024)
    session = model.session()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.spec.vocab_size, PROMPT_TOKENS).astype(np.int64)
    session.forward(prompt[:8])  # warm-up: compile / allocate
    ttft, tg = [], []
    for _ in range(repeats):
        session.reset()
        t0 = time.perf_counter()
        logits = session.forward(prompt)
        token = int(np.argmax(logits))
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(np.argmax(session.forward(np.array([token], np.int64))))
        tg.append(DECODE_TOKENS / (time.perf_counter() - t0))
    data = Path(model_path + ".data").stat().st_size
    return {
        "backend": backend,
        "threads": threads,
        "ttft_s": statistics.mean(ttft),
        "ttft_sd": statistics.pstdev(ttft),
        "pp_tps": PROMPT_TOKENS / statistics.mean(ttft),
        "tg_tps": statistics.mean(tg),
        "tg_sd": statistics.pstdev(tg),
        "peak_rss_mb": peak_rss_mb(),
        "weight_bytes_per_token": data,
        "decode_gbs": data * statistics.mean(tg) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="numba,onnxruntime")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--model", type=Path, help="a converted file to measure instead of the random Hunyuan-0.5B")
    ap.add_argument("--json", type=Path, default=OUT / "results.json")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.threads, args.repeats)))
        return
    OUT.mkdir(exist_ok=True)
    model = args.model or ensure_model()
    bandwidth = read_bandwidth_gbs(args.threads)
    rows = []
    for backend in args.backends.split(","):
        print(f"measuring {backend} ...", file=sys.stderr)
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(model),
                backend,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(
        f"\n{model.name} ({rows[0]['weight_bytes_per_token'] / 1e6:.0f} MB of "
        f"weights per token), {args.threads} threads, machine read bandwidth {bandwidth:.1f} GB/s\n"
    )
    print(
        "| backend | TTFT pp128 (s) | prefill tok/s | decode tg64 tok/s | decode GB/s | % of bandwidth "
        "| peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['ttft_s']:.3f} ± {r['ttft_sd']:.3f} | {r['pp_tps']:.1f} "
            f"| {r['tg_tps']:.2f} ± {r['tg_sd']:.2f} | {r['decode_gbs']:.2f} "
            f"| {100 * r['decode_gbs'] / bandwidth:.0f}% | {r['peak_rss_mb']:.0f} |"
        )
    if len(rows) == 2:
        print(
            f"\nnumba / onnxruntime: decode {rows[0]['tg_tps'] / rows[1]['tg_tps']:.2f}x, "
            f"TTFT {rows[1]['ttft_s'] / rows[0]['ttft_s']:.2f}x faster"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "speed": rows}, indent=2))
    if not args.skip_eval:
        subprocess.run([sys.executable, str(HERE / "eval_fp8.py"), "--markdown"], check=True)


if __name__ == "__main__":
    main()
