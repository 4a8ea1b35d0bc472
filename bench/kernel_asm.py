"""The hot loops of the linear kernels as this machine's numba compiles them, for a static throughput
estimate (bench/mca.py). Run where the kernels will run -- on the emulated Raspberry Pi 5 by `make
test-arm`, or on this host (x86) to check the estimate against measured speed:

    python bench/kernel_asm.py OUT_DIR

Writes OUT_DIR/<kernel>.s (the instructions of the kernel's innermost hot loop) and OUT_DIR/kernels.json:
per kernel, the FMAs of one loop iteration and what they do (weights decoded, tokens, FLOPs). Kernels:
- gemv: the one-token decode (hy_edge_ops.dot.row_dots on one row x one token), per-channel scales;
- gemv_block: the same with whole-vector block scales (`--granularity block:32`);
- batched: the batched decode's block (BATCH_ROWS rows x BATCH_TOKENS tokens);
- prefill: the prefill GEMM's microkernel (hy_edge_ops.gemm: NR rows x TV * VL tokens).

The hot loop of each is the innermost loop (a backward branch, the fewest instructions around it) with
the most vector FMAs; among loops with as many, the one with the fewest other multiplies (the per-channel
loop beside the block-scaled one, which multiplies each decoded vector by its scale).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel-asm-")  # numba shows no asm of cached code

import numpy as np  # noqa: E402
from hy_edge_ops import dot, gemm, isa, linear  # noqa: E402
from hy_edge_ops.fp8 import E4M3  # noqa: E402

_LABEL = re.compile(r"^(\.?L[\w$.]+|[\w$.]+):")
_X86_BRANCH = re.compile(r"^\s*(j[a-z]+)\s+(\S+)")
_ARM_BRANCH = re.compile(r"^\s*(b\.[a-z]+|b|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*?(\.?L\w+)\s*$")
# vector FMAs and lanes per instruction: x86 zmm / ymm / xmm, aarch64 v.4s
_X86_FMA = re.compile(r"vfn?m(add|sub)(132|213|231)ps\s")
_ARM_FMA = re.compile(r"^\s*fml[as]\s+v\d+\.4s")
_X86_MUL = re.compile(r"^\s*vmulps\s")
_ARM_MUL = re.compile(r"^\s*fmul\s+v\d+\.4s")


def _lanes_x86(line: str) -> int:
    return 16 if "zmm" in line else 8 if "ymm" in line else 4


def instructions(lines: list[str]) -> list[str]:
    """The instruction lines (no labels, directives or comments)."""
    out = []
    for line in lines:
        s = line.split("#")[0].split("//")[0].strip()
        if s and not s.startswith(".") and not _LABEL.match(s):
            out.append(line.rstrip())
    return out


def loops(asm: str) -> list[list[str]]:
    """Innermost loops: the lines from a label to a later branch back to it, holding no other such loop."""
    lines = asm.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        m = _X86_BRANCH.match(line) or _ARM_BRANCH.match(line)
        if m and m.group(2) in labels and labels[m.group(2)] < i:
            spans.append((labels[m.group(2)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [lines[a + 1 : b + 1] for a, b in inner]


def fma_count(body: list[str]) -> tuple[int, int, int]:
    """(vector FMAs, lanes per FMA, other vector multiplies) of a loop body."""
    fmas = [x for x in body if _X86_FMA.search(x) or _ARM_FMA.match(x)]
    muls = [x for x in body if _X86_MUL.match(x) or _ARM_MUL.match(x)]
    lanes = 4 if platform.machine() in ("aarch64", "arm64") else max([_lanes_x86(x) for x in fmas] or [4])
    return len(fmas), lanes, len(muls)


def hot_loop(asm: str, scaled: bool = False) -> tuple[list[str], int, int]:
    """The loop with the most FMAs (ties: the fewest other multiplies, or with `scaled` the most)."""
    best = None
    for body in loops(asm):
        n_fma, lanes, n_mul = fma_count(body)
        if n_fma == 0 or (scaled and n_mul == 0):
            continue
        key = (n_fma, n_mul if scaled else -n_mul)
        if best is None or key > best[0]:
            best = (key, body, lanes)
    if best is None:
        raise SystemExit("kernel_asm: no vector FMA loop found")
    return instructions(best[1]), best[0][0], best[2]


def _asm(fn) -> str:
    (text,) = fn.inspect_asm().values()
    return text


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/kernels")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    k = 256
    codes = rng.integers(0, 120, (64, k)).astype(np.uint8)
    per_channel = linear.prepare(codes, E4M3, np.full((64, 1), 1e-3, np.float32))
    x = rng.standard_normal((gemm.TV * gemm.VL + 1, k)).astype(np.float32)
    lin = linear.FusedLinear([per_channel])
    lin(x[:1], (np.empty((1, 64), np.float32),))  # _mv
    lin(x[:4], (np.empty((4, 64), np.float32),), batched=True)  # _mm
    lin(x, (np.empty((x.shape[0], 64), np.float32),))  # the prefill GEMM
    blocks = linear.prepare(codes, E4M3, np.full((64, k // 32), 1e-3, np.float32))
    linear.FusedLinear([blocks])(x[:1], (np.empty((1, 64), np.float32),))

    tokens = {"gemv": 1, "gemv_block": 1, "batched": dot.BATCH_TOKENS}
    found = {
        "gemv": hot_loop(_asm(linear._mv)),
        "gemv_block": hot_loop(_asm(linear._mv), scaled=True),
        "batched": hot_loop(_asm(linear._mm)),
        "prefill": hot_loop(_asm(gemm.mm_prefill)),
    }
    report = {"machine": platform.machine(), "isa": isa.ISA, "kernels": {}}
    for name, (body, n_fma, lanes) in found.items():
        (out / f"{name}.s").write_text("\n".join(body) + "\n")
        entry = {"file": f"{name}.s", "instructions": len(body), "fmas": n_fma, "lanes": lanes,
                 "flops": 2 * n_fma * lanes}  # fmt: skip
        if name in tokens:  # each decoded weight meets `tokens` tokens
            entry["weights"] = n_fma * lanes // tokens[name]
            entry["tokens"] = tokens[name]
        report["kernels"][name] = entry
    (out / "kernels.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
