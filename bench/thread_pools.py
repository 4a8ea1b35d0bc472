"""What running a model on another thread than the one that loaded it costs: one stream's decode tok/s on
the loading thread against the same decode on a second Python thread, in the same process.

numba's threading layer (GNU OpenMP) keeps a worker pool per thread that starts parallel kernels; with
two pools on a machine with as many threads as cores, OpenMP stops spin-waiting and every kernel waits
for sleeping workers. This is why `hy-edge serve` runs its engine on the main thread. Each round is a
fresh process that decodes on the main thread, then on a new thread, then on the main thread again
(A B A: the second A shows whether the second pool slows the first one too).

    python bench/thread_pools.py [--model M.onnx] [--rounds 3] [--tokens 128] [--json FILE]

Default model: the bundled SmolLM2 as `hy-edge run` converts it. Writes bench/out/thread_pools.json
(or --json) with the date, CPU, ISA and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import artifacts

HERE = Path(__file__).resolve().parent


def child(path: str, tokens: int, threads: int | None) -> dict:
    """One process: decode `tokens` greedy tokens on the main thread, on a second thread, on main again."""
    import numpy as np

    import edge_runtime

    model = edge_runtime.load(path, threads=threads)
    session = model.session()
    prompt = list(range(10, 42))

    def decode() -> float:
        session.reset()
        logits = session.forward(prompt)
        t = time.perf_counter()
        for _ in range(tokens):
            logits = session.forward([int(np.argmax(logits))])
        return tokens / (time.perf_counter() - t)

    decode()  # warm: kernels loaded, pages resident
    out = {"main": decode()}
    box = {}
    worker = threading.Thread(target=lambda: box.update(other=decode()))
    worker.start()
    worker.join()
    out["other thread"] = box["other"]
    out["main again"] = decode()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a converted .onnx (default: the bundled SmolLM2's cached conversion)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="the session's threads (default: the runtime's)")
    ap.add_argument("--json", type=Path, default=HERE / "out" / "thread_pools.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.tokens, args.threads)))
        return
    if args.model is None:
        from edge_runtime.cli.model import resolve_model

        args.model = str(resolve_model(None, notice=lambda m: print(m, file=sys.stderr)))
    where = artifacts.where_measured()  # the load before the runs
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--tokens", str(args.tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    rounds = []
    for i in range(args.rounds):
        rounds.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rounds[-1].items()), flush=True)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{Path(args.model).name}, {args.tokens} tokens, median of {args.rounds} processes:")
    for k, v in median.items():
        print(f"  {k:<13} {v:7.1f} tok/s ({v / median['main']:.2f}x main)")
    doc = {**where, "model": Path(args.model).name, "tokens": args.tokens, "threads": args.threads}
    artifacts.write_json(args.json, {**doc, "median_tok_s": median, "rounds": rounds})


if __name__ == "__main__":
    main()
