"""A static throughput estimate of the linear kernels' hot loops (from bench/kernel_asm.py) with LLVM's
llvm-mca, for a CPU we cannot run on here: the Raspberry Pi 5's Cortex-A76.

    python bench/mca.py DIR [--mcpu neoverse-n1] [--ghz 2.4] [--peak 16] [--out DIR/mca.json]

llvm-mca runs each loop for many iterations on its model of the CPU's pipelines and reports the cycles
(Debian's `llvm-19`: its Neoverse-N1 model is the server twin of the Cortex-A76, whose own name LLVM maps
to a Cortex-A57 model). Per kernel: cycles per 16 weights, GB/s of FP8 weights per core at --ghz (one
byte per weight), and for the prefill GEMM GFLOP/s against --peak FLOP per cycle per core (A76: two
128-bit FMA pipes = 16). An estimate of the loop alone, from L1: no cache misses, no memory bandwidth,
no thread hand-offs; `--check` compares the same analysis of this host's kernels with their measured
speed (bench/check_mca.py), which says how far to trust it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ITERATIONS = 1000
CANDIDATES = ("llvm-mca-19", "llvm-mca-20", "llvm-mca-21", "llvm-mca-18", "llvm-mca")
A76 = {"mcpu": "neoverse-n1", "triple": "aarch64-linux-gnu", "ghz": 2.4, "peak": 16}


class McaError(Exception):
    """llvm-mca is missing or failed; the message is one line."""


def llvm_mca() -> str:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise McaError("llvm-mca not found: install Debian's llvm-19 (apt install llvm-19)")


def cycles_per_iteration(asm: Path, mcpu: str, triple: str) -> float:
    """Steady-state cycles of one iteration of the loop in `asm`, by llvm-mca."""
    cmd = [llvm_mca(), f"-mtriple={triple}", f"-mcpu={mcpu}", f"-iterations={ITERATIONS}", str(asm)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
    if r.returncode != 0 or not m:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise McaError(f"llvm-mca -mcpu={mcpu} {asm.name}: {last}")
    return int(m.group(1)) / ITERATIONS


def estimate(directory: Path, mcpu: str, triple: str, ghz: float, peak: float) -> dict:
    """Per kernel of directory/kernels.json: cycles per iteration and the derived rates."""
    info = json.loads((directory / "kernels.json").read_text())
    out = {"mcpu": mcpu, "triple": triple, "ghz": ghz, "peak_flops_per_cycle": peak, "isa": info["isa"], "kernels": {}}
    for name, k in info["kernels"].items():
        cyc = cycles_per_iteration(directory / k["file"], mcpu, triple)
        e = {"cycles_per_iteration": cyc, "flops_per_cycle": k["flops"] / cyc}
        e["gflops_per_core"] = e["flops_per_cycle"] * ghz
        e["of_peak"] = e["flops_per_cycle"] / peak
        if "weights" in k:
            e["cycles_per_16_weights"] = cyc * 16 / k["weights"]
            e["fp8_gbs_per_core"] = k["weights"] / cyc * ghz  # one byte per FP8 weight
        out["kernels"][name] = e
    return out


def table(est: dict) -> str:
    rows = [f"{est['isa']} kernels on llvm-mca's {est['mcpu']} model at {est['ghz']} GHz (per core):"]
    for name, e in est["kernels"].items():
        if "fp8_gbs_per_core" in e:
            rows.append(
                f"  {name:<11} {e['cycles_per_16_weights']:5.2f} cycles / 16 weights = "
                f"{e['fp8_gbs_per_core']:5.2f} GB/s of FP8 weights"
            )
        else:
            rows.append(
                f"  {name:<11} {e['gflops_per_core']:5.1f} GFLOP/s = {100 * e['of_peak']:.0f}% of the fp32 peak "
                f"({est['peak_flops_per_cycle']:g} FLOP/cycle)"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--mcpu", default=A76["mcpu"])
    ap.add_argument("--triple", default=A76["triple"])
    ap.add_argument("--ghz", type=float, default=A76["ghz"])
    ap.add_argument("--peak", type=float, default=A76["peak"], help="fp32 FLOP per cycle per core")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        est = estimate(args.directory, args.mcpu, args.triple, args.ghz, args.peak)
    except (McaError, OSError, KeyError, ValueError) as e:
        sys.exit(f"mca: {e}")
    out = args.out or args.directory / f"mca-{args.mcpu}.json"
    out.write_text(json.dumps(est, indent=1) + "\n")
    print(table(est))


if __name__ == "__main__":
    main()
