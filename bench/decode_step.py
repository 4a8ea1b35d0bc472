"""Where a decode step goes: one step of the numba engine against the same step's GEMVs alone (every
prepared linear of the model, the head included, in the engine's order, on a fixed input), interleaved.

    python bench/decode_step.py [MODEL.onnx] [--threads 2] [--rounds 5] [--steps 16] [--batch B | --prefill T]
                                [--kv-cache fp32|fp16|fp8] [--prompt 128] [--json]

MODEL defaults to the bench's Hunyuan-0.5B default conversion (bench/out, made by `make bench`).
The difference between the two is everything that is not a GEMV: attention, norms, RoPE, SwiGLU, the
layer loop and Python. With --batch B, a step is `decode_batch` of B sequences (the serving engine's
step) and the GEMVs take B rows each, as in that step. With --prefill T, a step is the prefill of a
T-token prompt from an empty cache (the time to first token) against its GEMMs (T rows through every
layer's linears, one through the head). Decode steps start after a --prompt-token prompt in each
sequence (the attention's share grows with it; --kv-cache picks the cache's precision). --json prints one
line of JSON (milliseconds per step, FLOPs, weight bytes) instead of the table (make bench reads it).
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--prefill", type=int, default=0, help="a step is the prefill of T tokens")
    ap.add_argument("--kv-cache", default="fp32", choices=edge_runtime.KV_CACHES)
    ap.add_argument("--prompt", type=int, default=128, help="tokens cached in each sequence before decoding")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = ap.parse_args()
    if min(args.batch, args.prefill) < 0 or min(args.threads, args.rounds, args.steps, args.prompt) < 1:
        raise SystemExit(
            "decode_step: --threads, --rounds, --steps and --prompt must be >= 1, --batch and --prefill >= 0"
        )
    if args.batch and args.prefill:
        raise SystemExit("decode_step: --batch or --prefill, not both")
    path = args.model or default_model()
    B = max(1, args.batch)
    max_context = max(args.prompt + 2 * args.steps * (args.rounds + 1), args.prefill)
    model = edge_runtime.load(path, threads=args.threads, max_context=max_context, kv_cache=args.kv_cache)
    session = model.session(slots=B)
    rng = np.random.default_rng(0)
    vocab = session.spec.vocab_size
    for slot in range(B):
        session.forward(rng.integers(0, vocab, args.prompt), slot=slot)
    slots = np.arange(B)

    linears = [g for b in session._blocks for g, _ in (*b.qkv, (b.o, None), *b.gate_up, (b.down, None))]
    linears.append(session._head)
    rows = [args.prefill or B] * (len(linears) - 1) + [B]  # a prefill runs the head on its last row only
    pairs = list(zip(rows, linears, strict=True))
    inputs = {(r, f.k_dim): rng.standard_normal((r, f.k_dim)).astype(np.float32) for r, f in pairs}
    plan = [(f, inputs[r, f.k_dim], tuple(np.empty((r, op.w.shape[0]), np.float32) for op in f.ops)) for r, f in pairs]
    weight_bytes = sum(op.w.nbytes for f in linears for op in f.ops)
    flops = sum(2 * r * op.w.size for r, f in pairs for op in f.ops)
    prompt = rng.integers(0, vocab, max(1, args.prefill))

    def steps() -> None:
        for _ in range(args.steps):
            if args.prefill:
                session.reset()
                session.forward(prompt)
            elif args.batch:
                session.decode_batch(rng.integers(0, vocab, B), slots)
            else:
                session.forward(rng.integers(0, vocab, 1))

    def gemvs() -> None:
        for _ in range(args.steps):
            for f, x, outs in plan:
                f(x, outs, batched=args.batch > 1)

    steps(), gemvs()  # warm
    step = f"prefill of {args.prefill}" if args.prefill else "decode step"
    times: dict[str, list[float]] = {step: [], "its GEMVs alone": []}
    for _ in range(args.rounds):
        for name, fn in ((step, steps), ("its GEMVs alone", gemvs)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    if args.json:
        med = {name: statistics.median(ts) for name, ts in times.items()}
        step_s, gemm_s = med[step], med["its GEMVs alone"]
        figures = {"step_ms": step_s * 1e3, "gemm_ms": gemm_s * 1e3, "flops": flops, "weight_bytes": weight_bytes}
        print(json.dumps({**figures, "gemm_gflops": flops / gemm_s / 1e9, "threads": args.threads}))
        return
    what = f"decode_batch of {B}" if args.batch else f"a {args.prefill}-token prompt" if args.prefill else "one token"
    what += "" if args.prefill else f" after {args.prompt} cached"
    per_step = f"{weight_bytes / 1e6:.0f} MB of weights per step"
    print(f"{path.name}, {args.threads} threads, {what}, {args.kv_cache} KV, {per_step}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = f"{flops / med / 1e9:6.1f} GFLOP/s" if args.prefill else f"{B / med:6.1f} tok/s"
        print(
            f"{name:>16}: {med * 1e3:6.2f} ms (min {min(ts) * 1e3:.2f}), {weight_bytes / med / 1e9:5.1f} GB/s, {rate}"
        )


if __name__ == "__main__":
    main()
