"""One runtime in one process: `python bench/runners.py RUNTIME PATH --threads N --figures ...`.

Prints a line `{"ready": ...}` once the model is loaded and one token has gone through it (the parent
times process start -> that line as the cold start), then one JSON line with every figure asked for.
Each runtime gets the same token ids and does the same work: greedy argmax over the full vocabulary
after every forward, fresh KV cache for each prompt.

RUNTIME is one of: numba, onnxruntime (PATH a hy-edge .onnx), llama.cpp (PATH a .gguf), torch (PATH a
Hugging Face checkpoint directory, run in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

RUNTIMES = ("numba", "onnxruntime", "llama.cpp", "torch")
# fill: prefill the whole context, then a step; batch4: 4 sequences decoded together (hy-edge numba only)
FIGURES = ("ttft32", "ttft128", "ttft512", "decode", "fill", "batch4")
BATCH = 4  # sequences of the batch4 figure, one decode_batch step (one pass over the weights) per token
CONTEXT = 1024  # KV cache length every runtime allocates (llama.cpp n_ctx) unless --context says otherwise
DECODE_PROMPT = 16  # tokens before the timed decode
TOKEN_RANGE = (3, 49152)  # ids every runtime's vocabulary holds as ordinary tokens (see artifacts.py)


class Runner:
    """prefill(ids) -> next greedy token from a fresh cache; step(token) -> the next one."""

    prefill: Callable[[np.ndarray], int]
    step: Callable[[int], int]


class HyEdgeRunner(Runner):
    def __init__(self, path: str, backend: str, threads: int, context: int) -> None:
        import edge_runtime

        # threads 0: hy-edge's default (physical cores, giving way to other busy processes)
        model = edge_runtime.load(path, backend=backend, threads=threads or None, max_context=context)
        kv = os.environ.get("BENCH_KV_CACHE")  # set by run.py for its FP16 and FP8 KV cases
        self.model, self.kv = model, kv or "fp32"
        self.session = model.session(kv_cache=self.kv)

    def prefill(self, ids: np.ndarray) -> int:
        self.session.reset()
        return int(np.argmax(self.session.forward(ids.astype(np.int64))))

    def step(self, token: int) -> int:
        return int(np.argmax(self.session.forward(np.array([token], np.int64))))

    def batched(self, prompts: list[np.ndarray]) -> Callable[[], None]:
        """A session of len(prompts) slots with each prompt prefilled in its own; returns the step that
        decodes every sequence's next greedy token in one `decode_batch`."""
        session = self.model.session(slots=len(prompts), kv_cache=self.kv)
        slots = np.arange(len(prompts))
        tokens = [int(np.argmax(session.forward(p.astype(np.int64), slot=i))) for i, p in enumerate(prompts)]

        def step() -> None:
            logits = session.decode_batch(tokens, slots)
            tokens[:] = [int(t) for t in np.argmax(logits, axis=1)]

        return step


class LlamaCppRunner(Runner):
    def __init__(self, path: str, threads: int, context: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=context,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self._logits = lambda: np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.n_vocab,)
        )

    def prefill(self, ids: np.ndarray) -> int:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return int(np.argmax(self._logits()))

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(np.argmax(self._logits()))


class TorchRunner(Runner):
    def __init__(self, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache

        torch.set_num_threads(threads)
        self.torch, self.cache_cls = torch, DynamicCache
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.cache = None

    def _forward(self, ids) -> int:
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return int(np.argmax(out.logits[0, -1].numpy()))

    def prefill(self, ids: np.ndarray) -> int:
        self.cache = self.cache_cls(config=self.model.config)
        return self._forward(self.torch.from_numpy(ids.astype(np.int64))[None])

    def step(self, token: int) -> int:
        return self._forward(self.torch.tensor([[token]]))


def open_runner(runtime: str, path: str, threads: int, context: int = CONTEXT) -> Runner:
    if runtime in ("numba", "onnxruntime"):
        return HyEdgeRunner(path, runtime, threads, context)
    if runtime == "llama.cpp":
        return LlamaCppRunner(path, threads, context)
    return TorchRunner(path, threads)


class CpuMeter:
    """Wall time, this process's CPU time and every other process's CPU time (/proc/stat busy jiffies
    minus our own) over one measurement."""

    def __enter__(self) -> CpuMeter:
        self.t, self.own, self.busy = time.perf_counter(), _own_cpu(), _busy_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t
        own = _own_cpu() - self.own
        self.other = max(0.0, _busy_cpu() - self.busy - own)

    def record(self) -> dict:
        return {"wall_s": self.wall, "other_cpu_s": self.other}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _busy_cpu() -> float:
    """Seconds of CPU all processes used since boot (user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(runner: Runner, figures: Sequence[str], decode_tokens: int, seed: int = 0, context: int = CONTEXT) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {}
    for fig in figures:
        if fig == "fill":  # every position of the context cached: the KV cache at its largest
            ids = rng.integers(*TOKEN_RANGE, context - 1).astype(np.int64)
            with CpuMeter() as m:
                runner.step(runner.prefill(ids))
            out[fig] = {"value": m.wall, **m.record()}
        elif fig.startswith("ttft"):
            ids = rng.integers(*TOKEN_RANGE, int(fig[4:])).astype(np.int64)
            with CpuMeter() as m:
                runner.prefill(ids)
            out[fig] = {"value": m.wall, **m.record()}
        elif fig == "decode":
            token = runner.prefill(rng.integers(*TOKEN_RANGE, DECODE_PROMPT).astype(np.int64))
            with CpuMeter() as m:
                for _ in range(decode_tokens):
                    token = runner.step(token)
            out[fig] = {"value": decode_tokens / m.wall, "tokens": decode_tokens, **m.record()}
        elif fig == "batch4":  # aggregate tokens/s of BATCH sequences, each after its own DECODE_PROMPT
            step = runner.batched([rng.integers(*TOKEN_RANGE, DECODE_PROMPT).astype(np.int64) for _ in range(BATCH)])
            with CpuMeter() as m:
                for _ in range(decode_tokens):
                    step()
            out[fig] = {"value": BATCH * decode_tokens / m.wall, "tokens": BATCH * decode_tokens, **m.record()}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runtime", choices=RUNTIMES)
    ap.add_argument("path", type=Path)
    ap.add_argument("--threads", type=int, required=True, help="0: the runtime's default (hy-edge only)")
    ap.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset of " + ", ".join(FIGURES))
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=CONTEXT, help="KV cache length (tokens) the runtime allocates")
    args = ap.parse_args()
    figures = [f for f in args.figures.split(",") if f]
    bad = [f for f in figures if f not in FIGURES]
    default_ok = args.threads == 0 and args.runtime in ("numba", "onnxruntime")
    if "batch4" in figures and args.runtime != "numba":
        sys.exit("runners: batch4 is a figure of hy-edge's numba backend")
    longest = max([int(f[4:]) for f in figures if f.startswith("ttft")] + [DECODE_PROMPT + args.decode_tokens])
    short = args.context <= longest
    if bad or (args.threads < 1 and not default_ok) or args.decode_tokens < 1 or short or not args.path.exists():
        what = f"unknown figure {bad[0]!r}" if bad else f"{args.path} is missing, a count < 1 or --context too short"
        sys.exit(f"runners: {what}")
    t0 = time.perf_counter()
    runner = open_runner(args.runtime, str(args.path), args.threads, args.context)
    runner.step(runner.prefill(np.arange(*TOKEN_RANGE)[:8]))  # warm: JIT cache load, first allocations
    print(json.dumps({"ready": time.perf_counter() - t0}), flush=True)
    print(json.dumps(measure(runner, figures, args.decode_tokens, context=args.context)), flush=True)


if __name__ == "__main__":
    main()
