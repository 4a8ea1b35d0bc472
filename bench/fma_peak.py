"""The machine's fp32 FMA peak for a vector ISA, the yardstick of the prefill GEMM: bench/fma_peak.c,
OpenMP threads each running 12 independent chains of vector multiply-adds, built with gcc for the ISA
the bench measures (AVX2 code on an AVX-512 host, like the kernels under `make bench ISA=avx2`).

    python bench/fma_peak.py [--threads 2] [--isa native|avx2]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

from bandwidth import build_c

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "fma_peak.c"
FLAGS = {  # gcc flags and vector width (fp32 lanes) per ISA
    "avx512": (["-mavx512f", "-mfma"], 16),
    "avx2": (["-mavx2", "-mfma"], 8),
    "neon": ([], 4),
}


def build(out_dir: Path, isa: str) -> Path | None:
    """bench/out/fma_peak-<isa>; None (with a one-line reason on stderr) without gcc or for an unknown ISA."""
    if isa not in FLAGS:
        print(f"fma_peak: no build for ISA {isa}", file=sys.stderr)
        return None
    flags, width = FLAGS[isa]
    return build_c(C_SOURCE, out_dir / f"fma_peak-{isa}", ["-ffp-contract=fast", *flags, f"-DVW={width}"], "fma_peak")


def gflops(exe: Path, threads: int, million_steps: int = 100) -> float:
    r = subprocess.run([str(exe), str(threads), str(million_steps)], capture_output=True, text=True, check=True)
    return float(r.stdout.strip())


def main() -> None:
    from hy_edge_ops import isa as isa_mod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default="native")
    args = ap.parse_args()
    isa = isa_mod.ISA if args.isa == "native" else args.isa
    if args.threads < 1:
        sys.exit("fma_peak: --threads must be >= 1")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    exe = build(out, isa)
    if exe is None:
        sys.exit(1)
    print(f"{isa} on {platform.machine()}, {args.threads} threads: {gflops(exe, args.threads):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
