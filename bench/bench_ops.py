"""GEMV throughput at Hunyuan-0.5B shapes: FP8 (E4M3, Gaussian and uniformly random codes), FP16 and
float32 weights, through the engine's prepared (unchecked) kernels; with --blocks, block weights
(hy_edge_ops.blockq: int8, uint4, e2m1, e3m2, e2m3) beside E4M3 per channel, one token (the GEMV) and
four (the batched kernel), the storages interleaved rep by rep (a shared machine's noise hits them alike).

Usage: python bench/bench_ops.py [--threads 2] [--reps 30] [--blocks]
GB/s counts the bytes of weights read per call (1 B/weight FP8, 2 FP16, 4 FP32; block weights: codes
and scales, e.g. e2m1 18 B per 32 weights).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from hy_edge_ops import blockq
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


BLOCK_STORAGES = ("e4m3", *blockq.STORAGES)


def block_weight(storage: str, n: int, k: int, rng) -> tuple:
    """A prepared random weight of `storage` and the bytes a call reads (codes and scales)."""
    g = k // blockq.BLOCK
    if storage == "e4m3":
        codes = rng.integers(0, 120, (n, k)).astype(np.uint8)  # no NaN codes
        scales = np.full((n, 1), 1e-3, np.float32)
        return prepare(codes, E4M3, scales), codes.nbytes + scales.nbytes
    codes = rng.integers(0, 256, (n, g * blockq.CODE_BYTES[storage])).astype(np.uint8)
    if storage == "int8":
        codes = codes.view(np.int8)
    scales = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float16).view(np.uint16)
    offsets = scales if storage == "uint4" else None
    return prepare(codes, storage, scales, offsets), codes.nbytes + scales.nbytes * (1 + (offsets is not None))


def bench_blocks(args, rng) -> None:
    tokens = (1, 4)  # the one-token GEMV, the batched kernel on four tokens
    print(f"{'shape N x K':>16} {'storage':>8} " + " ".join(f"{f'GB/s T={t} best':>15} {'med':>6}" for t in tokens))
    for n, k in SHAPES[:2]:
        ops = {s: block_weight(s, n, k, rng) for s in BLOCK_STORAGES}
        x = rng.standard_normal((max(tokens), k)).astype(np.float32)
        cases = {}
        for s, (op, nbytes) in ops.items():
            lin = FusedLinear([op])
            for t in tokens:
                out = np.empty((t, n), np.float32)
                cases[s, t] = (lambda f=lin, x=x[:t], o=out, b=t > 1: f(x, (o,), b), nbytes)
                cases[s, t][0]()  # compiled before timing
        times = {key: [] for key in cases}
        for _ in range(args.reps):  # interleaved
            for key, (fn, _) in cases.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        for s in BLOCK_STORAGES:
            row = []
            for t in tokens:
                nbytes = cases[s, t][1]
                row.append(f"{nbytes / min(times[s, t]) / 1e9:15.2f} {nbytes / np.median(times[s, t]) / 1e9:6.2f}")
            print(f"{n:>8} x {k:<5} {s:>8} " + " ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--blocks", action="store_true", help="block weights against E4M3, 1 and 4 tokens")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"numba threads {numba.get_num_threads()}")
    if args.blocks:
        bench_blocks(args, rng)
        return
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
