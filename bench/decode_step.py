"""Where a decode step goes: one step of the numba engine against the same step's GEMVs alone (every
prepared linear of the model, the head included, in the engine's order, on a fixed input), interleaved.

    python bench/decode_step.py [MODEL.onnx] [--threads 2] [--rounds 5] [--steps 16] [--batch B]

MODEL defaults to the bench's Hunyuan-0.5B default conversion (bench/out, made by `make bench`).
The difference between the two is everything that is not a GEMV: attention, norms, RoPE, SwiGLU, the
layer loop and Python. With --batch B, a step is `decode_batch` of B sequences (the serving engine's
step) and the GEMVs take B rows each, as in that step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import edge_runtime

OUT = Path(__file__).resolve().parent / "out"


def default_model() -> Path:
    found = sorted(OUT.glob("hunyuan-0.5b-random.*.onnx"))
    for path in found:  # the default conversion: E4M3 with an FP8 head
        policy = Path(str(path) + ".policy.json")
        if policy.exists() and '"lm_head_fp8": true' in policy.read_text() and '"format": "e4m3"' in policy.read_text():
            return path
    raise SystemExit("decode_step: no default Hunyuan conversion in bench/out (run `make bench` once)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=0, help="B sequences per step through decode_batch")
    args = ap.parse_args()
    if args.batch < 0 or args.threads < 1 or args.rounds < 1 or args.steps < 1:
        raise SystemExit("decode_step: --threads, --rounds and --steps must be >= 1, --batch >= 0")
    path = args.model or default_model()
    B = max(1, args.batch)
    max_context = 128 + 2 * args.steps * (args.rounds + 1)
    session = edge_runtime.load(path, threads=args.threads, max_context=max_context).session(slots=B)
    rng = np.random.default_rng(0)
    vocab = session.spec.vocab_size
    for slot in range(B):
        session.forward(rng.integers(0, vocab, 128), slot=slot)
    slots = np.arange(B)

    linears = [g for b in session._blocks for g, _ in (*b.qkv, (b.o, None), *b.gate_up, (b.down, None))]
    linears.append(session._head)
    inputs = {f.k_dim: rng.standard_normal((B, f.k_dim)).astype(np.float32) for f in linears}
    plan = [(f, inputs[f.k_dim], tuple(np.empty((B, op.w.shape[0]), np.float32) for op in f.ops)) for f in linears]
    weight_bytes = sum(op.w.nbytes for f in linears for op in f.ops)

    def steps() -> None:
        for _ in range(args.steps):
            if args.batch:
                session.decode_batch(rng.integers(0, vocab, B), slots)
            else:
                session.forward(rng.integers(0, vocab, 1))

    def gemvs() -> None:
        for _ in range(args.steps):
            for f, x, outs in plan:
                f(x, outs, batched=args.batch > 1)

    steps(), gemvs()  # warm
    times: dict[str, list[float]] = {"decode step": [], "its GEMVs alone": []}
    for _ in range(args.rounds):
        for name, fn in (("decode step", steps), ("its GEMVs alone", gemvs)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    what = f"decode_batch of {B}" if args.batch else "one token"
    print(f"{path.name}, {args.threads} threads, {what}, {weight_bytes / 1e6:.0f} MB of weights per step")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:>16}: {med * 1e3:6.2f} ms (min {min(ts) * 1e3:.2f}), {weight_bytes / med / 1e9:5.1f} GB/s,"
            f" {B / med:6.1f} tok/s"
        )


if __name__ == "__main__":
    main()
