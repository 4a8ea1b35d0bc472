"""GEMV throughput at Hunyuan-0.5B shapes: FP8 (E4M3, Gaussian and uniformly random codes), FP16 and
float32 weights, through the engine's prepared (unchecked) kernels.

Usage: python bench/bench_ops.py [--threads 2] [--reps 30]
GB/s counts the bytes of weights read per call (1 B/weight FP8, 2 FP16, 4 FP32).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from hy_edge_ops.fp8 import E4M3, quantize_fp8
from hy_edge_ops.linear import FusedLinear, prepare

SHAPES = [(3584, 1024), (1024, 3584), (120818, 1024)]  # (N, K): gate/up, down, tied lm_head


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"numba threads {numba.get_num_threads()}")
    print(f"{'shape N x K':>16} {'kernel':>9} {'best ms':>8} {'med ms':>8} {'GB/s best':>9} {'GB/s med':>9}")
    for n, k in SHAPES:
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        x = rng.standard_normal(k).astype(np.float32)
        out = np.empty((1, n), np.float32)
        scales = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
        codes = quantize_fp8(w, scales, E4M3)
        rand = rng.integers(0, 256, (n, k)).astype(np.uint8)
        rand[(rand & 0x7F) == 0x7F] = 0  # NaN codes are refused at load
        half = w.astype(np.float16).view(np.uint16)
        lins = [
            ("fp8", FusedLinear([prepare(codes, E4M3, scales)]), codes.nbytes),
            ("fp8 rand", FusedLinear([prepare(rand, E4M3, scales)]), rand.nbytes),
            ("fp16", FusedLinear([prepare(half, "fp16")]), half.nbytes),
            ("fp32", FusedLinear([prepare(w, "fp32")]), w.nbytes),
        ]
        x1 = x.reshape(1, -1)
        cases = [(name, nbytes, lambda f=f, x1=x1, o=out: f(x1, (o,))) for name, f, nbytes in lins]
        for name, nbytes, fn in cases:
            best, med = timed(fn, args.reps)
            print(
                f"{n:>8} x {k:<5} {name:>9} {best * 1e3:8.3f} {med * 1e3:8.3f} "
                f"{nbytes / best / 1e9:9.2f} {nbytes / med / 1e9:9.2f}"
            )


if __name__ == "__main__":
    main()
