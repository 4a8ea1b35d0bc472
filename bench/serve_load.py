"""Aggregate decode tokens/s of the serving engine at 1, 2, 4, 8 concurrent streams (issue 10's target:
>= 2.5x at 4 streams vs 1), on the full Hunyuan-0.5B shapes with deterministic random weights.

For each stream count N, N requests with different prompts of the same length are submitted together to
the engine of `hy-edge serve` (edge_runtime.serve.engine, in this process, no HTTP; as in the server, the
engine runs on the thread that loaded the model); every token's arrival time is recorded. The figure is
the steady state: tokens that arrived while all N streams were decoding, divided by the length of that
window (prefill and the ragged ends are left out). EOS is ignored so every stream runs its full length.
`--url` measures a running `hy-edge serve` over HTTP instead (streamed completions, token arrivals as
server-sent events; text prompts; the key, if the server wants one, from $HY_EDGE_API_KEY); it needs only
what the `serve` extra installs (httpx).

    python bench/serve_load.py                     # 24 layers, 1 2 4 8 streams, 128 tokens each
    python bench/serve_load.py --layers 2 --tokens 32 --streams 1 2 4   # a smoke run
    python bench/serve_load.py --url http://127.0.0.1:8000 --streams 1 4
    python bench/serve_load.py --stall 512        # a 512-token prompt's cost to a running stream
    python bench/serve_load.py --health 512       # /health's latency while a 512-token prompt is prefilled
    python bench/serve_load.py --race 3 --streams 1 4   # hy-edge serve vs llama-server -np 4, over HTTP
Writes bench/out/serve_load.json (serve_stall.json with --stall, serve_health.json with --health,
serve_race.json with --race, which builds llama.cpp's llama-server once from the pinned sdist; or --out:
date, CPU, ISA and load average included) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import artifacts
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = str(HERE / "out" / "serve_load.json")
sys.path.insert(0, str(HERE))


def steady_tps(arrivals: list[list[float]]) -> tuple[float, float, int]:
    """(tokens/s, window s, tokens) over the window in which every stream had started and none had ended."""
    start = max(a[0] for a in arrivals)
    end = min(a[-1] for a in arrivals)
    if end <= start:
        return 0.0, 0.0, 0
    n = sum(sum(1 for t in a if start < t <= end) for a in arrivals)
    return n / (end - start), end - start, n


def run_engine(model, streams: int, tokens: int, prompt_tokens: int, threads: int | None, kv_cache: str) -> dict:
    from edge_runtime.serve.engine import Engine, Request

    session = model.session(slots=streams, max_context=prompt_tokens + tokens + 1, threads=threads, kv_cache=kv_cache)
    rng = np.random.default_rng(0)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    done = threading.Semaphore(0)

    def emit_to(i: int):
        def emit(event) -> None:
            arrivals[i].append(time.perf_counter())
            if getattr(event, "finish_reason", None) or not hasattr(event, "finish_reason"):
                done.release()

        return emit

    V = model.spec.vocab_size

    def submit_all() -> None:  # on the engine's thread, once warm
        for i in range(streams):
            prompt = rng.integers(0, V, prompt_tokens).tolist()
            engine.submit(Request(prompt, tokens, emit_to(i)))

    def stop_when_done() -> None:
        for _ in range(streams):
            done.acquire()
        engine.stop()

    engine = Engine(session, None, max_queue=streams, on_ready=submit_all)
    engine.eos_ids = frozenset()  # random weights: run every stream to its full length
    threading.Thread(target=stop_when_done, daemon=True).start()
    engine.run()  # on this thread, which loaded the model, as `hy-edge serve` does (Engine.run)
    tps, window, n = steady_tps(arrivals)
    return {"streams": streams, "decode_tps": tps, "window_s": window, "tokens_in_window": n}


def run_stall(model, prompt_tokens: int, threads: int | None, kv_cache: str, max_stall: float) -> dict:
    """What a long prompt costs a running stream: one stream decodes; after its 40th token a prompt of
    `prompt_tokens` random tokens arrives. The stream's gaps between tokens: median before, median and
    longest while the prompt is prefilled; and the prompt's time to first token. max_stall as Engine takes
    it (a huge one: pieces of the session's whole chunk, the scheduler before pieces were sized by time)."""
    from edge_runtime.serve.engine import Engine, Request

    tokens = 40 + 4 * prompt_tokens // 8  # enough to outlast the prefill on any machine
    session = model.session(slots=2, max_context=max(prompt_tokens, 8 + tokens) + 2, threads=threads, kv_cache=kv_cache)
    rng = np.random.default_rng(0)
    times: list[float] = []
    marks: dict[str, float] = {}
    started, answered = threading.Event(), threading.Event()

    def on_token(event) -> None:
        times.append(time.perf_counter())
        if len(times) == 40:
            started.set()

    def on_long(event) -> None:
        marks["first"] = time.perf_counter()
        answered.set()

    def submit_stream() -> None:
        engine.submit(Request(rng.integers(0, model.spec.vocab_size, 8).tolist(), tokens, on_token))

    def drive() -> None:
        started.wait()
        marks["submitted"] = time.perf_counter()
        engine.submit(Request(rng.integers(0, model.spec.vocab_size, prompt_tokens).tolist(), 1, on_long))
        answered.wait()
        time.sleep(0.2)
        engine.stop()

    engine = Engine(session, None, max_queue=2, on_ready=submit_stream, max_stall=max_stall)
    engine.eos_ids = frozenset()
    threading.Thread(target=drive, daemon=True).start()
    engine.run()
    gaps = np.diff(times)
    during = [g for t, g in zip(times[1:], gaps, strict=True) if marks["submitted"] < t <= marks["first"] + 0.2]
    median = float(np.median(gaps[:39]))
    return {
        "max_stall": max_stall,
        "median_gap_s": median,
        "median_gap_during_s": float(np.median(during)),
        "p99_gap_during_s": float(np.percentile(during, 99)),
        "p99_over_median": float(np.percentile(during, 99)) / median,
        "longest_gap_s": float(max(during)),
        "prompt_ttft_s": marks["first"] - marks["submitted"],
        "gaps_during_ms": [round(g * 1000, 1) for g in during],
    }


# a client of its own (another process, so that only the server's latency is measured, and a bare socket, so
# that the client's own set-up is not): GET /health on a new connection every `interval` s until its stdin
# closes; writes [(sent, latency s, answered 200)] to `out`
POLLER = """
import json, socket, sys, threading, time
host, port, interval, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
ask = b"GET /health HTTP/1.1\\r\\nHost: bench\\r\\nConnection: close\\r\\n\\r\\n"
rows = []
while not done.is_set():
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(ask)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    t1 = time.monotonic()
    rows.append((t0, t1 - t0, answer.startswith(b"HTTP/1.1 200")))
    time.sleep(max(0.0, interval - (t1 - t0)))
json.dump(rows, open(out, "w"))
"""


def _latencies(rows: list, lo: float, hi: float) -> dict:
    ms = np.array([dt for t, dt, _ in rows if lo <= t < hi]) * 1000
    bad = sum(1 for t, _, ok in rows if lo <= t < hi and not ok)
    if not ms.size:
        return {"polls": 0}
    return {
        "polls": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()), "not_200": bad,
    }  # fmt: skip


def run_health(model, prompt_tokens: int, threads: int | None, kv_cache: str, interval: float = 0.01) -> dict:
    """/health while the server is busy: the engine of `hy-edge serve` on this process's main thread, its
    ASGI app under uvicorn on a second thread (as `hy-edge serve` runs them), one stream decoding; after its 40th
    token a prompt of `prompt_tokens` random tokens arrives. A client process polls GET /health every
    `interval` s throughout; its latencies while only the stream decodes, and while the prompt is prefilled
    (from its submission to its first token)."""
    import uvicorn

    from edge_runtime.serve.engine import Engine, Request
    from edge_runtime.serve.http import Service, build_asgi

    tokens = 40 + 4 * prompt_tokens // 8
    session = model.session(slots=2, max_context=max(prompt_tokens, 8 + tokens) + 2, threads=threads, kv_cache=kv_cache)
    rng = np.random.default_rng(0)
    marks: dict[str, float] = {}
    count = [0]
    started, answered = threading.Event(), threading.Event()

    def on_token(event) -> None:
        count[0] += 1
        if count[0] == 40:
            started.set()

    def on_long(event) -> None:
        marks["first"] = time.monotonic()
        answered.set()

    engine = Engine(session, None, max_queue=2)
    engine.eos_ids = frozenset()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(build_asgi(Service(model, "bench", engine)), lifespan="off", log_level="warning")
    )
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    http.start()
    out = Path(tempfile.mkstemp(prefix="hy-edge-health-", suffix=".json")[1])

    def drive() -> None:
        engine.ready.wait()
        while not server.started:
            time.sleep(0.01)
        port = str(sock.getsockname()[1])
        poller = subprocess.Popen(
            [sys.executable, "-c", POLLER, "127.0.0.1", port, str(interval), str(out)], stdin=subprocess.PIPE
        )
        time.sleep(0.5)  # the poller's start-up
        marks["idle"] = time.monotonic()
        time.sleep(1.0)  # the engine idle: the floor
        marks["stream"] = time.monotonic()
        engine.submit(Request(rng.integers(0, model.spec.vocab_size, 8).tolist(), tokens, on_token))
        started.wait()
        marks["submitted"] = time.monotonic()
        engine.submit(Request(rng.integers(0, model.spec.vocab_size, prompt_tokens).tolist(), 1, on_long))
        answered.wait()
        poller.stdin.close()
        poller.wait()
        server.should_exit = True
        http.join()
        engine.stop()

    threading.Thread(target=drive, daemon=True).start()
    engine.run()  # on this thread, which loaded the model, as `hy-edge serve` does (Engine.run)
    rows = json.loads(out.read_text())
    out.unlink()
    return {
        "interval_s": interval,
        "idle": _latencies(rows, marks["idle"], marks["stream"]),
        "decoding": _latencies(rows, marks["stream"], marks["submitted"]),
        "prefilling": _latencies(rows, marks["submitted"], marks["first"]),
        "prompt_ttft_s": marks["first"] - marks["submitted"],
    }


def run_http(url: str, streams: int, tokens: int, extra: dict | None = None) -> dict:
    """`streams` streamed completions at once. A server need not send an event per token (hy-edge holds back
    a token whose text is empty or an incomplete character), so the tokens are the usage each stream reports
    at its end (`stream_options.include_usage`), and the figure is every token after each stream's first over
    the time from the first of those first tokens to the last token of all."""
    import httpx

    arrivals: list[list[float]] = [[] for _ in range(streams)]
    counts = [0] * streams
    barrier = threading.Barrier(streams)
    key = os.environ.get("HY_EDGE_API_KEY")  # a server that asks for a key: the same variable it reads
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def one(i: int) -> None:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
        barrier.wait()
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now, chunk = time.perf_counter(), json.loads(line[6:])
                    if chunk.get("choices"):
                        arrivals[i].append(now)
                    if chunk.get("usage"):
                        counts[i] = chunk["usage"]["completion_tokens"]

    ts = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if not all(arrivals) or not all(counts):
        raise RuntimeError(f"a stream sent no tokens or no usage: {counts} tokens, {[len(a) for a in arrivals]} events")
    start, end = min(a[0] for a in arrivals), max(a[-1] for a in arrivals)
    n = sum(counts) - streams
    tps = n / (end - start) if end > start else 0.0
    return {"streams": streams, "decode_tps": tps, "window_s": end - start, "tokens_in_window": n, "tokens": counts,
            "events": [len(a) for a in arrivals]}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server was not ready in time")


def race(args) -> None:
    """hy-edge serve against llama.cpp's llama-server -np S on the same random Hunyuan-0.5B weights (E4M3
    per channel against llama.cpp's Q8_0, the bench's default pair; fp16 KV caches both), each a fresh
    process per round, rounds interleaved (A B A B ...), both driven over HTTP by the same client
    (`run_http`): streamed completions, greedy, `--tokens` each."""
    ckpt = artifacts.checkpoint(args.layers)
    # the server needs a tokenizer: the weights and config with the GGUF's synthetic one (the same text gives
    # the same token ids on both sides), rounded to nearest as `make bench`'s conversion of `ckpt`
    ours = (
        Path(args.model)
        if args.model
        else artifacts.hy_edge_model(artifacts.gguf_source(ckpt), {"rounding": "nearest"})
    )
    gguf = artifacts.gguf(ckpt, "q8_0")
    from hy_edge_ops import isa as isa_mod

    native = args.isa in ("native", isa_mod.ISA)
    server = artifacts.llama_server(None if native else args.isa)  # llama.cpp built for the ISA
    ours_env = {**os.environ, **({} if native else isa_mod.codegen_env(args.isa))}  # numba compiling for it
    where = {**artifacts.where_measured(), "isa": isa_mod.ISA if native else args.isa}
    slots, threads = max(args.streams), args.threads or 2
    ctx = args.prompt_tokens + args.tokens + 64
    log = open(HERE / "out" / "serve_race.log", "w")

    def hy_edge(port: int) -> list[str]:
        return [sys.executable, "-m", "edge_runtime", "serve", "--model", str(ours), "--port", str(port),
                "--max-batch", str(slots), "--threads", str(threads), "--max-context", str(ctx),
                "--kv-cache", "fp16"]  # fmt: skip

    def llama(port: int) -> list[str]:
        return [str(server), "-m", str(gguf), "--port", str(port), "-np", str(slots), "-c", str(slots * ctx),
                "-t", str(threads), "-tb", str(threads), "--no-webui", "-ctk", "f16", "-ctv", "f16"]  # fmt: skip

    sides = {"hy-edge": (hy_edge, {}, ours_env), "llama-server": (llama, {"ignore_eos": True}, None)}
    rounds: dict[str, list[list[dict]]] = {name: [] for name in sides}
    for r in range(args.race):
        for name, (command, extra, env) in sides.items():
            port = _free_port()
            proc = subprocess.Popen(
                command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_healthy(url, proc)
                run_http(url, 1, 8, extra)  # a first request (lazy set-up of either side) outside the figures
                rounds[name].append([run_http(url, n, args.tokens, extra) for n in args.streams])
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            row = " ".join(f"{x['streams']}:{x['decode_tps']:.1f}" for x in rounds[name][-1])
            print(f"round {r + 1} {name}: {row} tok/s", file=sys.stderr)
    print(f"aggregate decode ({where['isa']}), {args.tokens} tokens a stream, {threads} threads, median of "
          f"{args.race} rounds: {ours.name} vs {gguf.name}")  # fmt: skip
    print("| streams | hy-edge serve tok/s | llama-server tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    table = []
    for i, n in enumerate(args.streams):
        a = float(np.median([rr[i]["decode_tps"] for rr in rounds["hy-edge"]]))
        b = float(np.median([rr[i]["decode_tps"] for rr in rounds["llama-server"]]))
        table.append({"streams": n, "hy_edge_tps": a, "llama_server_tps": b, "ratio": a / b if b else None})
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    suffix = "" if native else f"-{args.isa}"
    out = Path(args.out if args.out != DEFAULT_OUT else str(HERE / "out" / f"serve_race{suffix}.json"))
    doc = {"hy_edge_model": ours.name, "gguf": gguf.name, "threads": threads, "tokens": args.tokens, **where}
    artifacts.write_json(out, {**doc, "load_average_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
                               "median": table, "rounds": rounds})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="layers of the random Hunyuan-0.5B checkpoint")
    ap.add_argument("--model", default=None, help="a converted .onnx instead of the random checkpoint")
    ap.add_argument("--url", default=None, help="measure a running hy-edge serve over HTTP instead")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per stream")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-cache", default="fp32", choices=["fp32", "fp16", "fp8"])
    ap.add_argument("--out", default=DEFAULT_OUT, help="the JSON record (default bench/out/serve_load.json, "
                    "with --stall serve_stall.json)")  # fmt: skip
    ap.add_argument(
        "--stall", type=int, default=None, metavar="N", help="measure what an N-token prompt costs a running stream"
    )
    ap.add_argument(
        "--max-stall",
        type=float,
        nargs="+",
        default=None,
        metavar="X",
        help="with --stall: the engine's max_stall values to compare (default: 1e9, whole pieces through every "
        "layer as when nothing decodes, and the engine's default)",
    )
    ap.add_argument(
        "--health",
        type=int,
        default=None,
        metavar="N",
        help="measure /health's latency while an N-token prompt is prefilled",
    )
    ap.add_argument(
        "--isa",
        default="native",
        choices=["native", "avx2"],
        help="with --race: the vector ISA of both servers' kernels (avx2 on an AVX-512 host: hy-edge's kernels "
        "compiled without AVX-512, llama-server built with LLAMA_CPP_CMAKE's AVX2 flags)",
    )
    ap.add_argument(
        "--race",
        type=int,
        default=None,
        metavar="ROUNDS",
        help="race hy-edge serve against llama.cpp's llama-server -np S over HTTP, ROUNDS interleaved rounds",
    )
    args = ap.parse_args()
    if args.race:
        race(args)
        return
    if args.stall:
        stall(args)
        return
    if args.health:
        health(args)
        return

    if args.url:
        label = args.url
        results = [run_http(args.url.rstrip("/"), n, args.tokens) for n in args.streams]
    else:
        import edge_runtime

        path = Path(args.model) if args.model else artifacts.hy_edge_model(artifacts.checkpoint(args.layers), {})
        label = path.name
        model = edge_runtime.load(path)
        results = [
            run_engine(model, n, args.tokens, args.prompt_tokens, args.threads, args.kv_cache) for n in args.streams
        ]
    base = next((r["decode_tps"] for r in results if r["streams"] == 1), None)
    print(f"serve load: {label}, {args.tokens} tokens per stream")
    print("| streams | aggregate decode tok/s | per stream | vs 1 stream |")
    print("|---:|---:|---:|---:|")
    for r in results:
        r["speedup"] = r["decode_tps"] / base if base else None
        ratio = f"{r['speedup']:.2f}x" if base else "-"
        print(f"| {r['streams']} | {r['decode_tps']:.1f} | {r['decode_tps'] / r['streams']:.1f} | {ratio} |")
    meta = {"model": label, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, **artifacts.where_measured()}
    artifacts.write_json(Path(args.out), {**meta, "threads": args.threads, "results": results})


def stall(args) -> None:
    import edge_runtime

    path = Path(args.model) if args.model else artifacts.hy_edge_model(artifacts.checkpoint(args.layers), {})
    model = edge_runtime.load(path)
    where = artifacts.where_measured()  # the load before the runs
    if args.max_stall is None:
        from edge_runtime.serve.engine import MAX_STALL

        args.max_stall = [1e9, MAX_STALL]
    names = [("whole pieces, all layers" if m >= 1e9 else f"slices (max_stall {m:g})") for m in args.max_stall]
    results = [run_stall(model, args.stall, args.threads, args.kv_cache, m) for m in args.max_stall]
    print(f"a {args.stall}-token prompt beside a running stream: {path.name}")
    print("| prefill | stream's median gap before | during the prefill: median | p99 | p99 / median before "
          "| longest | the prompt's first token |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r, name in zip(results, names, strict=True):
        print(
            f"| {name} | {r['median_gap_s'] * 1000:.0f} ms | {r['median_gap_during_s'] * 1000:.0f} ms "
            f"| {r['p99_gap_during_s'] * 1000:.0f} ms | {r['p99_over_median']:.2f}x "
            f"| {r['longest_gap_s'] * 1000:.0f} ms | {r['prompt_ttft_s']:.2f} s |"
        )
    out = Path(args.out if args.out != DEFAULT_OUT else str(HERE / "out" / "serve_stall.json"))
    doc = {"model": path.name, "prompt_tokens": args.stall, **where, "threads": args.threads}
    artifacts.write_json(out, {**doc, "results": dict(zip(names, results, strict=True))})


def health(args) -> None:
    import edge_runtime

    path = Path(args.model) if args.model else artifacts.hy_edge_model(artifacts.checkpoint(args.layers), {})
    model = edge_runtime.load(path)
    where = artifacts.where_measured()  # the load before the run
    r = run_health(model, args.health, args.threads, args.kv_cache)
    print(f"GET /health beside a running stream, then while a {args.health}-token prompt is prefilled: {path.name}")
    print("| while | polls | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    for name in ("idle", "decoding", "prefilling"):
        x = r[name]
        print(f"| {name} | {x['polls']} | {x['p50_ms']:.1f} ms | {x['p99_ms']:.1f} ms | {x['max_ms']:.1f} ms |")
    print(f"the prompt's first token after {r['prompt_ttft_s']:.2f} s; load average before: {where['load_average']}")
    out = Path(args.out if args.out != DEFAULT_OUT else str(HERE / "out" / "serve_health.json"))
    doc = {"model": path.name, "prompt_tokens": args.health, **where, "threads": args.threads}
    artifacts.write_json(
        out, {**doc, "load_average_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]), **r}
    )


if __name__ == "__main__":
    main()
