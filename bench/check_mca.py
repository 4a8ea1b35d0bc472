"""How far to trust llvm-mca's estimate of our kernels: the same analysis as the Raspberry Pi 5 projection
(bench/kernel_asm.py, bench/mca.py), run on this x86 host's own kernels, against their measured speed.

    python bench/check_mca.py [--isa native|avx2] [--reps 30] [--json bench/results/check-mca-<isa>.json]

One thread, data in cache (the estimate is of the loop alone): the one-token GEMV and its block-scaled
twin over 192 rows x 1024 (192 KB of FP8), the batched kernel on BATCH_TOKENS tokens, and the prefill GEMM
over 128 tokens. The clock is the effective one: the AVX2 FMA probe's GFLOP/s over 32 FLOP per cycle (two
256-bit FMA pipes, every x86 core since Haswell and Zen 2), so that predicted and measured rates compare
in the same unit. Prints predicted / measured per kernel, and the prefill GEMM against the one-core FMA peak
of the ISA's code (bench/fma_peak.c); --json records it all with the date, CPU and load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import artifacts
import fma_peak
import mca

HERE = Path(__file__).resolve().parent
AVX2_FLOP_PER_CYCLE = 32


def measure(reps: int) -> dict:
    """Single-thread rates of the kernels on in-cache data (in this process's ISA)."""
    import numba
    import numpy as np
    from hy_edge_ops import dot, gemm, linear
    from hy_edge_ops.fp8 import E4M3

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, k = 192, 1024
    codes = rng.integers(0, 120, (n, k)).astype(np.uint8)
    ops = {
        "gemv": linear.prepare(codes, E4M3, np.full((n, 1), 1e-3, np.float32)),
        "gemv_block": linear.prepare(codes, E4M3, np.full((n, k // 32), 1e-3, np.float32)),
    }
    x = rng.standard_normal((128, k)).astype(np.float32)

    def best(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    out = {}
    for name, op in ops.items():
        f, o = linear.FusedLinear([op]), np.empty((1, n), np.float32)
        out[name] = {"fp8_gbs": codes.nbytes / best(lambda f=f, o=o: f(x[:1], (o,))) / 1e9}
    f, bt = linear.FusedLinear([ops["gemv"]]), dot.BATCH_TOKENS
    o = np.empty((bt, n), np.float32)
    out["batched"] = {"fp8_gbs": codes.nbytes / best(lambda: f(x[:bt], (o,), True)) / 1e9}
    big = rng.integers(0, 120, (1024, k)).astype(np.uint8)
    pf = linear.FusedLinear([linear.prepare(big, E4M3, np.full((1024, 1), 1e-3, np.float32))])
    o = np.empty((128, 1024), np.float32)
    out["prefill"] = {"gflops": 2 * 128 * big.size / best(lambda: pf(x, (o,))) / 1e9}
    out["tile"] = {"vl": gemm.VL, "nr": gemm.NR, "tv": gemm.TV}
    return out


def main() -> None:
    from hy_edge_ops import isa as isa_mod
    from llvmlite import binding as llvm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default="native")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = ap.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.reps)))
        return
    isa = isa_mod.ISA if args.isa == "native" else args.isa
    try:
        env = {**os.environ, **isa_mod.codegen_env(isa)}
    except ValueError as e:
        sys.exit(f"check_mca: --isa: {e}")
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    exe = fma_peak.build(out_dir, "avx2")
    if exe is None:
        sys.exit("check_mca: the FMA probe did not build")
    where = artifacts.where_measured()  # the load before the probes
    where["isa"] = isa
    avx2_peak = fma_peak.gflops(exe, 1)
    ghz = avx2_peak / AVX2_FLOP_PER_CYCLE
    isa_exe = exe if isa == "avx2" else fma_peak.build(out_dir, isa)
    isa_peak = avx2_peak if isa_exe == exe else fma_peak.gflops(isa_exe, 1) if isa_exe else None
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(HERE / "kernel_asm.py"), d], env=env, check=True, capture_output=True)
        cpu = llvm.get_host_cpu_name()
        est = mca.estimate(Path(d), cpu, "x86_64-linux-gnu", ghz, 2 * AVX2_FLOP_PER_CYCLE if isa == "avx512" else 32)
    child = [sys.executable, __file__, "--measure-only", "--reps", str(args.reps)]
    measured = json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
    print(f"{isa} kernels, 1 thread, in cache; llvm-mca -mcpu={cpu}; effective clock {ghz:.2f} GHz (AVX2 FMA probe)")
    print(f"{'kernel':<11} {'predicted':>12} {'measured':>12} {'measured / predicted':>22}")
    kernels = {}
    for name, e in est["kernels"].items():
        if name == "prefill":
            p, m, unit = e["gflops_per_core"], measured[name]["gflops"], "GFLOP/s"
        else:
            p, m, unit = e["fp8_gbs_per_core"], measured[name]["fp8_gbs"], "GB/s"
        kernels[name] = {"unit": unit, "predicted": round(p, 2), "measured": round(m, 2), "ratio": round(m / p, 3)}
        print(f"{name:<11} {p:7.1f} {unit:<7} {m:7.1f} {unit:<7} {m / p:14.2f}")
    prefill = measured["prefill"]["gflops"]
    if isa_peak:
        share = prefill / isa_peak
        print(f"prefill GEMM {prefill:.1f} GFLOP/s = {share:.0%} of the one-core {isa} FMA peak {isa_peak:.1f}")
    if args.json:
        doc = {**where, "llvm_mca_cpu": cpu, "effective_ghz": round(ghz, 3), "reps": args.reps,
               "fma_peak_one_core_gflops": round(isa_peak, 1) if isa_peak else None,
               "prefill_of_fma_peak": round(prefill / isa_peak, 3) if isa_peak else None,
               "tile": measured["tile"], "kernels": kernels}  # fmt: skip
        artifacts.write_json(args.json, doc)


if __name__ == "__main__":
    main()
