"""The machine's read bandwidth, measured the way decode reads weights: compiled code, every thread
streaming its own contiguous slice of a large array once.

`numba_read_gbs` is what the bench uses (the same threading layer as the kernels); `c_read_gbs` runs
the OpenMP reference in bench/bandwidth.c (built with gcc -O3 -march=native -fopenmp into bench/out)
so the bench can record how close the numba reader gets to it.

    python bench/bandwidth.py [--threads 2] [--mb 1024]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "bandwidth.c"
PASSES = 7


def numba_read_gbs(threads: int, megabytes: int = 1024) -> float:
    """Best of PASSES parallel uint64 sums over `megabytes` MB (integer adds vectorise without fastmath).
    Looping over a slice per block matters: indexing the whole array with computed bounds did not
    vectorise and read 3.8 GB/s where the C reference read 18."""
    import numba

    numba.set_num_threads(threads)

    @numba.njit(parallel=True, cache=False)
    def _fill(a, blocks):
        step = (a.shape[0] + blocks - 1) // blocks
        for b in numba.prange(blocks):
            x = a[b * step : min(a.shape[0], (b + 1) * step)]
            for i in range(x.shape[0]):
                x[i] = i

    @numba.njit(parallel=True, cache=False)
    def _read(a, blocks):
        step = (a.shape[0] + blocks - 1) // blocks
        partial = np.zeros(blocks * 8, np.uint64)  # one cache line per block
        for b in numba.prange(blocks):
            x = a[b * step : min(a.shape[0], (b + 1) * step)]  # a slice: the loop below vectorises
            s = np.uint64(0)
            for i in range(x.shape[0]):
                s += x[i]
            partial[b * 8] = s
        return partial.sum()

    a = np.empty(megabytes * 1_000_000 // 8, np.uint64)
    blocks = 32 * threads  # many small blocks: a thread delayed by another process does not hold up the pass
    _fill(a, blocks)
    _read(a[:4096], blocks)  # compile
    best = float("inf")
    for _ in range(PASSES):
        t = time.perf_counter()
        _read(a, blocks)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def build_c(source: Path, exe: Path, flags: list[str], what: str) -> Path | None:
    """`exe` built from `source` with gcc -O3 `flags` -fopenmp (again when the source is newer), written to a
    temporary name first; None, with a one-line reason on stderr naming `what`, without gcc or on failure."""
    if exe.exists() and exe.stat().st_mtime >= source.stat().st_mtime:
        return exe
    if shutil.which("gcc") is None:
        print(f"{what}: gcc not found, not built", file=sys.stderr)
        return None
    tmp = exe.with_name(exe.name + ".partial")
    r = subprocess.run(["gcc", "-O3", *flags, "-fopenmp", str(source), "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{what}: did not build: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    tmp.replace(exe)
    return exe


def build_c_reference(out_dir: Path) -> Path | None:
    """bench/out/bandwidth from bandwidth.c; None (with a one-line reason on stderr) without gcc/OpenMP."""
    return build_c(C_SOURCE, out_dir / "bandwidth", ["-march=native"], "bandwidth: the C reference")


def c_read_gbs(exe: Path, threads: int, megabytes: int = 1024) -> float:
    r = subprocess.run([str(exe), str(threads), str(megabytes)], capture_output=True, text=True, check=True)
    return float(r.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=int, default=1024)
    args = ap.parse_args()
    if args.threads < 1 or args.mb < 1:
        sys.exit("bandwidth: --threads and --mb must be >= 1")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    print(f"numba reader: {numba_read_gbs(args.threads, args.mb):.2f} GB/s")
    exe = build_c_reference(out)
    if exe is not None:
        print(f"C reference:  {c_read_gbs(exe, args.threads, args.mb):.2f} GB/s")


if __name__ == "__main__":
    main()
