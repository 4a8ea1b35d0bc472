"""A Cortex-A76 estimate of the block-weight kernels' hot loops (hy_edge_ops.blockq) without an ARM machine:
the kernels' LLVM IR as numba emits it for the NEON shapes (LANES 16, the NEON decode routes), compiled
by llvmlite's AArch64 backend for the Cortex-A76, the hot loop found as bench/kernel_asm.py finds it,
then llvm-mca (bench/mca.py). Run on x86:

    python bench/mca_blocks.py [--storages e4m3,int8,uint4,e2m1,e3m2,e2m3,e2m1q8,e2m3q8] [--mcpu cortex-a76]
                               [--json FILE]

(`e2m1q8`, `e2m3q8`: those codes with inputs rounded to int8, the integer-dot kernels.)

An estimate of the loop alone, from L1 (see bench/mca.py), and of IR that numba's x86 pipeline optimised
(the kernels are explicit vectors, so little of it is x86's) -- `make test-arm` runs the real thing.
Prints, per storage and kernel, cycles per 16 weights and Gweights/s per core at 2.4 GHz.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _stub_x86(ir_text: str) -> str:
    """The module with every function that calls an x86 intrinsic (numba's reference counts, as x86's
    pipeline rewrote them; no hot loop) reduced to `unreachable`, so that AArch64 can compile it."""
    out = []
    for chunk in re.split(r"(?m)^(?=define )", ir_text):
        if chunk.startswith("define ") and "@llvm.x86." in chunk:
            head, _, rest = chunk.partition("{\n")
            chunk = head + "{\n  unreachable\n}\n" + rest[rest.index("\n}\n") + 3 :]
        out.append(chunk)
    return "".join(out)


def child(storage: str, out_dir: Path) -> None:
    """In a process that believes it runs on aarch64: compile, retarget, write <kernel>.s and a json."""
    platform.machine = lambda: "aarch64"  # hy_edge_ops.isa picks the NEON shapes and decode routes
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="mca-blocks-")
    import numpy as np
    from hy_edge_ops import blockq, dot, isa, linear
    from llvmlite import binding as llvm

    sys.path.insert(0, str(HERE))
    from kernel_asm import hot_loop

    assert isa.ISA == "neon" and dot.LANES == 16
    rng = np.random.default_rng(0)
    n, k = 64, 256
    if storage == "e4m3":
        op = linear.prepare(rng.integers(0, 120, (n, k)).astype(np.uint8), "e4m3", np.full((n, 1), 1e-3, np.float32))
    else:
        acts = "q8" if storage.endswith("q8") else "none"
        storage = storage.removesuffix("q8")
        w = rng.integers(0, 256, (n, k // 32 * blockq.CODE_BYTES[storage])).astype(np.uint8)
        scales = np.full((n, k // 32), 0x3C00, np.uint16)
        op = linear.prepare(w.view(np.int8) if storage == "int8" else w, storage, scales,
                            scales if storage == "uint4" else None, activations=acts)  # fmt: skip
        storage += "q8" if acts == "q8" else ""
    # weights per FMA lane: 1, or 4 for the integer dots (each float lane adds an int32 sum of 4 products)
    per_lane = 4 if storage.endswith("q8") else 1
    lin = linear.FusedLinear([op])
    x = rng.standard_normal((4, k)).astype(np.float32)
    lin(x[:1], (np.empty((1, n), np.float32),))
    lin(x, (np.empty((4, n), np.float32),), batched=True)
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple("aarch64-linux-gnu").create_target_machine(cpu="cortex-a76", opt=3)
    report = {}
    for name, fn, tokens in (("gemv", linear._mv, 1), ("batched", linear._mm, dot.BATCH_TOKENS)):
        (ir_text,) = fn.inspect_llvm().values()
        ir_text = re.sub(r'"target-(cpu|features)"="[^"]*"', "", _stub_x86(ir_text))
        ir_text = re.sub(r"^target (triple|datalayout) = .*$", "", ir_text, flags=re.M)
        mod = llvm.parse_assembly(ir_text)
        mod.triple, mod.data_layout = "aarch64-unknown-linux-gnu", str(tm.target_data)
        body, n_fma, lanes = hot_loop(tm.emit_assembly(mod))
        (out_dir / f"{storage}-{name}.s").write_text("\n".join(body) + "\n")
        weights = n_fma * 4 * per_lane // tokens
        report[name] = {"file": f"{storage}-{name}.s", "instructions": len(body), "weights": weights}
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storages", default="e4m3,int8,uint4,e2m1,e3m2,e2m3,e2m1q8,e2m3q8")
    ap.add_argument("--mcpu", default="cortex-a76")
    ap.add_argument("--ghz", type=float, default=2.4)
    ap.add_argument("--json", type=Path, help="also write the table here (bench/report.py reads its gemv rows)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    import mca

    table: dict = {}
    with tempfile.TemporaryDirectory() as d:
        print(f"llvm-mca -mcpu={args.mcpu}, hot loops of the NEON kernels, {args.ghz} GHz, one core, from L1")
        print(f"{'storage':>8} {'kernel':>8} {'instr':>6} {'cycles/16 w':>12} {'Gweights/s':>11}")
        for storage in args.storages.split(","):
            cmd = [sys.executable, __file__, "--child", storage, d]
            info = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for name, k in info.items():
                cyc = mca.cycles_per_iteration(Path(d) / k["file"], args.mcpu, "aarch64-linux-gnu")
                print(f"{storage:>8} {name:>8} {k['instructions']:6d} {cyc * 16 / k['weights']:12.2f} "
                      f"{k['weights'] / cyc * args.ghz:11.2f}")  # fmt: skip
                row = {
                    "cycles_per_16_weights": cyc * 16 / k["weights"],
                    "gweights_per_core": k["weights"] / cyc * args.ghz,
                }
                table.setdefault(storage, {})[name] = row
    if args.json:
        doc = {"mcpu": args.mcpu, "ghz": args.ghz, "storages": table}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
