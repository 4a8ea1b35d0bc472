"""`make bench`: hy-edge against llama.cpp, onnxruntime and PyTorch on the full Hunyuan-0.5B shapes
(deterministic random weights), each runtime in its own fresh process, interleaved round by round.

Figures per runtime: decode tok/s, TTFT at 32/128/512 prompt tokens, peak RSS, cold start, weight bytes
per token and the GB/s decode reaches against the machine's read bandwidth measured in the same run;
decode under one competing busy process; peak RSS with the whole context cached (1,024 and 2,048
tokens); hy-edge's batched decode (4 sequences per `decode_batch` step, against one); the ratios hy-edge /
llama.cpp Q8_0; a Raspberry Pi 5 projection. Writes bench/results/latest.{json,md,png}.

    python bench/run.py [--rounds 3] [--threads 2] [--quick] [--layers 24] [--isa native|avx2] [--out PREFIX]
    python bench/run.py --quick     # one round: decode + TTFT 128, hy-edge numba vs llama.cpp Q8_0

--isa avx2 on an AVX-512 host measures what most laptops, desktops and VMs run: hy-edge's kernels compiled
by numba for the host CPU without its AVX-512 features (hy_edge_ops.isa.codegen_env), llama.cpp from a
second llama-cpp-python build with AVX-512 off (kept under bench/out), PyTorch with ATEN_CPU_CAPABILITY=avx2,
and the FMA peak of AVX2 code. onnxruntime chooses its kernels at run time: it runs with the host's ISA.
Results go to bench/results/latest.{json,md,png} for the host's own ISA, latest-avx2.* for --isa avx2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import artifacts
import fma_peak
import report
from bandwidth import build_c_reference, c_read_gbs, numba_read_gbs
from hy_edge_ops import isa as isa_mod

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# hy-edge numba variants, one line each: (label, QuantPolicy fields). The first is the default conversion
# (whatever hy_edge_convert's defaults are); the onnxruntime backend runs on that same file.
VARIANTS = [
    ("default", {}),  # E4M3 per channel, FP8 copy of the tied head
    ("FP16 lm_head", {"lm_head_fp8": False}),  # the head read from the FP16 embedding
]
# below eight bits (--subbyte races them alone): the formats' own rows, raced beside llama.cpp's 4-6 bit types
SUBBYTE_VARIANTS = [
    ("FP4 e2m1", {"format": "e2m1"}),
    ("FP4 e2m1, FP6 head", {"format": "e2m1", "tensor_formats": [["lm_head.weight", "e2m3"]]}),
    ("FP6 e2m3", {"format": "e2m3"}),
    # the same files' linears fed inputs rounded to int8 per block of 32: integer dots (blockq.INTEGER_INPUTS)
    ("FP4 e2m1, q8 inputs", {"format": "e2m1", "activations": "q8"}),
    ("FP6 e2m3, q8 inputs", {"format": "e2m3", "activations": "q8"}),
]
LLAMA_CPP_QUANTS = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")  # made by llama.cpp's quantizer from its F16 file
KEPT_QUANTS = ("Q4_K_M", "Q6_K")  # --subbyte: hy-edge's default conversion of those files too (blocks kept)
CONTENTION_TOKENS = 32  # decode tokens under contention (a step may take ~0.5 s there)
CONTENTION_CASES = ("hy-edge numba default", "llama.cpp Q8_0")
BATCH_CASES = ("hy-edge numba default",)  # 4 sequences decoded together, in a process of their own
# peak RSS with every position of the context cached, at these context lengths (llama.cpp's n_ctx)
FILLED_CONTEXTS = (1024, 2048)
FILLED_CASES = (
    "hy-edge numba default",
    "hy-edge numba default, FP16 KV",
    "hy-edge numba default, FP8 KV",
    "llama.cpp Q8_0",
)


@dataclass
class Case:
    """One runtime on one artifact, as it appears in the results."""

    name: str
    runtime: str  # runners.RUNTIMES
    path: Path
    bytes_per_token: int
    figures: tuple[str, ...] = ("ttft32", "ttft128", "ttft512", "decode")
    contention: bool = False
    env: dict = field(default_factory=dict)
    threads: int | None = None  # None: --threads; 0: the runtime's own default
    context: int = 1024  # KV cache length the runtime allocates
    isa: str = ""  # the vector ISA the runtime's kernels use in this run (isa_env)


def isa_env(runtime: str, isa: str, notes: list[str]) -> tuple[dict, str]:
    """Environment for a child of `runtime` to run kernels of `isa`, and the ISA its row names."""
    if isa == isa_mod.ISA:
        return {}, isa
    if runtime == "numba":
        return isa_mod.codegen_env(isa), isa
    if runtime == "llama.cpp":
        site = artifacts.llama_cpp_site(isa)  # raises ArtifactError when it cannot be built
        return {"PYTHONPATH": os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))}, isa
    if runtime == "torch" and isa == "avx2":
        return {"ATEN_CPU_CAPABILITY": "avx2"}, isa
    return {}, f"{isa_mod.ISA} (chosen at run time)"


def apply_isa(cases: list[Case], isa: str, notes: list[str]) -> list[Case]:
    """Each case with its ISA's environment; llama.cpp cases dropped (with a note) if no build for `isa`."""
    kept = []
    for c in cases:
        try:
            env, c.isa = isa_env(c.runtime, isa, notes)
        except artifacts.ArtifactError as e:
            note(notes, f"{c.name}: {e}; going on without it")
            continue
        c.env = {**env, **c.env}
        kept.append(c)
    return kept


def build_cases(args, ckpt: Path, notes: list[str]) -> list[Case]:
    short = args.quick or args.subbyte
    full = ("decode", "ttft128") if short else ("ttft32", "ttft128", "ttft512", "decode")
    cases = []
    variants = VARIANTS[:1] if short else VARIANTS
    if not args.quick:
        variants = variants + SUBBYTE_VARIANTS
    for i, (label, policy) in enumerate(variants):
        model = artifacts.hy_edge_model(ckpt, policy)
        cases.append(Case(f"hy-edge numba {label}", "numba", model, artifacts.hy_edge_bytes_per_token(model), full))
        if i == 0 and not short:
            onnx_case = Case("hy-edge onnxruntime default", "onnxruntime", model, cases[0].bytes_per_token, full)
            for kv in ("fp16", "fp8"):  # the default conversion with a smaller KV cache
                case = Case(f"hy-edge numba default, {kv.upper()} KV", "numba", model, cases[0].bytes_per_token, full)
                case.env = {"BENCH_KV_CACHE": kv}
                cases.append(case)
    if not short:
        cases.append(onnx_case)
    if llama_cpp_available(notes):
        for ftype in () if args.quick else LLAMA_CPP_QUANTS:
            try:
                path = artifacts.gguf_quantized(ckpt, ftype)
            except artifacts.ArtifactError as e:
                note(notes, f"llama.cpp {ftype}: {e}; going on without it")
                continue
            cases.append(Case(f"llama.cpp {ftype}", "llama.cpp", path, artifacts.gguf_bytes_per_token(path), full))
            if args.subbyte and ftype in KEPT_QUANTS:
                kept = artifacts.hy_edge_model(path, {})
                bytes_per_token = artifacts.hy_edge_bytes_per_token(kept)
                cases.append(Case(f"hy-edge numba {ftype} kept", "numba", kept, bytes_per_token, full))
        for outtype in ("q8_0",) if short else ("q8_0", "f16"):
            try:
                path = artifacts.gguf(ckpt, outtype)
            except artifacts.ArtifactError as e:
                note(notes, f"llama.cpp {outtype}: {e}; going on without it")
                continue
            name = f"llama.cpp {outtype.upper()}"
            cases.append(Case(name, "llama.cpp", path, artifacts.gguf_bytes_per_token(path), full))
    if not short:
        n_params = torch_params(ckpt)
        cases.append(Case("PyTorch fp32 (transformers)", "torch", ckpt, 4 * n_params, full))
        for c in list(cases):
            if c.name in CONTENTION_CASES:
                cases.append(Case(c.name + " + busy", c.runtime, c.path, c.bytes_per_token, ("decode",), True))
            if c.name == CONTENTION_CASES[0]:  # hy-edge's default thread count gives way to busy processes
                name = c.name + ", default threads + busy"
                cases.append(Case(name, c.runtime, c.path, c.bytes_per_token, ("decode",), True, threads=0))
            if c.name in BATCH_CASES:
                name = c.name + report.BATCH_SUFFIX
                cases.append(Case(name, c.runtime, c.path, c.bytes_per_token, ("batch4",), env=c.env))
            if c.name in FILLED_CASES:
                for n in FILLED_CONTEXTS:
                    name = f"{c.name} @ {n} filled"
                    cases.append(Case(name, c.runtime, c.path, c.bytes_per_token, ("fill",), env=c.env, context=n))
    return cases


def llama_cpp_available(notes: list[str]) -> bool:
    try:
        importlib.metadata.version("llama-cpp-python")
        return True
    except importlib.metadata.PackageNotFoundError:
        note(notes, "llama.cpp: llama-cpp-python is not installed (the bench extra did not build); going on without it")
        return False


def torch_params(ckpt: Path) -> int:
    """Parameters of the checkpoint (tied: the embedding counted once, as fp32 decode reads it once)."""
    import struct

    with open(ckpt / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total


def note(notes: list[str], text: str) -> None:
    notes.append(text)
    print(f"\n{text}", file=sys.stderr)


def run_child(case: Case, args, rnd: int) -> dict:
    """Start a fresh process for `case`; cold start = process start -> its `ready` line."""
    threads = args.threads if case.threads is None else case.threads
    cmd = [sys.executable, str(HERE / "runners.py"), case.runtime, str(case.path), "--threads", str(threads)]
    tokens = CONTENTION_TOKENS if case.contention else args.decode_tokens
    cmd += ["--figures", ",".join(case.figures), "--decode-tokens", str(tokens), "--context", str(case.context)]
    env = {**os.environ, **case.env, "OMP_NUM_THREADS": str(args.threads)}
    busy = None
    if case.contention:  # one competing busy process for the whole run
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready_line = proc.stdout.readline()
        ready_s = time.perf_counter() - t0
        rest, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"case": case.name, "round": rnd, "error": f"timed out after {args.timeout} s"}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0 or not ready_line.startswith("{"):
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"case": case.name, "round": rnd, "error": f"exit {proc.returncode}: {last}"}
    run = {"case": case.name, "round": rnd, "ready_s": ready_s, "contention": case.contention}
    run["in_process_ready_s"] = json.loads(ready_line)["ready"]
    run["result"] = json.loads(rest.strip().splitlines()[-1])
    return run


def prefill_gemms(case: Case, args) -> dict | None:
    """The GEMMs of a 128-token prefill alone against the whole prefill, in one process (bench/decode_step.py):
    the GEMMs' GFLOP/s, compared with the FMA peak of the same ISA."""
    cmd = [sys.executable, str(HERE / "decode_step.py"), str(case.path), "--prefill", "128", "--json"]
    cmd += ["--threads", str(args.threads), "--rounds", "3", "--steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **case.env}, timeout=args.timeout)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def first_jit(case: Case, args) -> float | None:
    """Cold start with an empty numba cache: the first-ever JIT compile."""
    with tempfile.TemporaryDirectory(dir=artifacts.OUT) as d:
        c = Case(case.name, case.runtime, case.path, 0, ("ttft32",), env={**case.env, "NUMBA_CACHE_DIR": d})
        run = run_child(c, args, 0)
    return run.get("ready_s")


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def show(self, label: str) -> None:
        width = 30
        fill = int(width * self.done / max(1, self.total))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        line = f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {elapsed / 60:4.1f} min"
        line += f" (~{eta / 60:.0f} min left) {label[:40]:<40}" if self.done else f" {label[:40]:<40}"
        print(line, end="", file=sys.stderr, flush=True)

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)


def machine_info() -> dict:
    cpu, mhz, flags = platform.processor(), 0.0, []
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                cpu = value
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
            elif key == "flags" and not flags:
                wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16")
                flags = [x for x in value.split() if x in wanted]
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    versions = {}
    for pkg in ("hy-edge", "numpy", "numba", "onnxruntime", "llama-cpp-python", "torch", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    versions["hy-edge commit"] = commit.stdout.strip() or None
    versions["python"] = platform.python_version()
    return {
        "cpu": cpu,
        "ghz": mhz / 1000,
        "cores": os.cpu_count(),
        "flags": flags,
        "mem_gb": mem_kb / 1e6,
        "kernel": platform.release(),
        "versions": versions,
    }


def summary_screen(result: dict) -> None:
    figs = result["figures"]
    print("\n")
    print(f"{'runtime':<34}{'decode tok/s':>14}{'TTFT 128 s':>12}{'TTFT 512 s':>12}{'peak RSS MB':>13}")
    for case, f in figs.items():
        cells = [
            f"{f[k]['median']:.{d}f}" if k in f else "-"
            for k, d in (("decode", 1), ("ttft128", 2), ("ttft512", 2), ("peak_rss_mb", 0))
        ]
        print(f"{case:<34}{cells[0]:>14}{cells[1]:>12}{cells[2]:>12}{cells[3]:>13}")
    if result["ratios"]:
        print("\nhy-edge / llama.cpp Q8_0 (decode > 1 is faster; TTFT, RSS < 1 are better):")
        for case, r in result["ratios"].items():
            parts = [f"{k} {r[k]:.2f}x" for k in ("decode", "ttft128", "ttft512", "peak_rss_mb") if k in r]
            print(f"  {case:<32}" + "  ".join(parts))
    bw = result["bandwidth"]
    c = f", C reference {bw['c_gbs']:.1f} GB/s" if bw.get("c_gbs") else ""
    print(f"\nread bandwidth {bw['numba_gbs']:.1f} GB/s (numba reader{c})")
    if result["flagged"]:
        print(f"{len(result['flagged'])} measurement(s) flagged: other processes were busy (see the .md)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument(
        "--quick", action="store_true", help="one round: decode + TTFT 128, hy-edge numba vs llama.cpp Q8_0"
    )
    ap.add_argument(
        "--subbyte",
        action="store_true",
        help="the sub-byte race: decode + TTFT 128 of hy-edge's FP4/FP6 variants and its default against "
        "llama.cpp Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0 (bench/results/subbyte[-<isa>].*)",
    )
    ap.add_argument("--layers", type=int, default=24, help="fewer layers for a smoke run (not Hunyuan-0.5B then)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds one child process may take")
    ap.add_argument("--isa", default="native", help="native, or avx2 on an AVX-512 host (see above)")
    ap.add_argument(
        "--out",
        type=Path,
        help="output prefix (default bench/results/latest[-<isa>]; --quick: bench/out/quick[-<isa>])",
    )
    args = ap.parse_args()
    isa = isa_mod.ISA if args.isa == "native" else args.isa
    try:
        isa_mod.codegen_env(isa)
    except ValueError as e:
        sys.exit(f"bench: --isa: {e}")
    if args.rounds < 1 or args.threads < 1 or args.decode_tokens < 1 or not 1 <= args.layers <= 24:
        sys.exit("bench: --rounds, --threads and --decode-tokens must be >= 1, --layers 1..24")
    if args.quick:
        args.rounds = 1
    # the host's own ISA keeps the name bench/results/latest.* (tools read it); a narrower one gets its own
    suffix = "" if isa == isa_mod.ISA else f"-{isa}"
    out = args.out or (
        artifacts.OUT / f"quick{suffix}"
        if args.quick
        else RESULTS / f"subbyte{suffix}"
        if args.subbyte
        else RESULTS / f"latest{suffix}"
    )
    if args.layers != 24 and args.out is None and not args.quick:
        out = artifacts.OUT / f"smoke-{args.layers}l{suffix}"  # never overwrite the committed results with a smoke run
    artifacts.OUT.mkdir(exist_ok=True)
    notes: list[str] = []

    print("building artifacts (once, cached under bench/out) ...", file=sys.stderr)
    ckpt = artifacts.checkpoint(args.layers)
    cases = apply_isa(build_cases(args, ckpt, notes), isa, notes)
    bytes_per_token = {c.name: c.bytes_per_token for c in cases}
    numba_case = cases[0]
    short = args.quick or args.subbyte
    prog = Progress(args.rounds * (len(cases) + 1) + (1 if short else 2) + 2)
    prog.show("read bandwidth")
    c_exe = build_c_reference(artifacts.OUT)
    c_gbs = c_read_gbs(c_exe, args.threads) if c_exe else None
    bw_runs = [numba_read_gbs(args.threads)]
    fma_exe = fma_peak.build(artifacts.OUT, isa)
    fma_runs = [fma_peak.gflops(fma_exe, args.threads)] if fma_exe else []
    prog.step("bandwidth")
    first_jit_s = None
    if not short:
        prog.show("first-ever JIT compile")
        first_jit_s = first_jit(numba_case, args)
        prog.step("first JIT")
    prog.show("warming the JIT cache")  # kernels changed since the last run compile here, not in round 1
    run_child(Case(numba_case.name, "numba", numba_case.path, 0, ("ttft32",), env=numba_case.env), args, 0)
    prog.step("JIT cache warm")
    runs = []
    for rnd in range(1, args.rounds + 1):
        for case in cases:
            prog.show(f"round {rnd}/{args.rounds}: {case.name}")
            run = run_child(case, args, rnd)
            if "error" in run:
                note(notes, f"{case.name}, round {rnd}: {run['error']}")
            runs.append(run)
            prog.step(case.name)
        bw_runs.append(numba_read_gbs(args.threads))  # bandwidth sampled between rounds, like the runtimes
        if fma_exe:
            fma_runs.append(fma_peak.gflops(fma_exe, args.threads))
        prog.step("bandwidth")
    prog.show("prefill GEMMs alone")
    gemms = prefill_gemms(numba_case, args)
    if gemms is None:
        note(notes, "the prefill GEMM probe (bench/decode_step.py --prefill 128) failed")
    if gemms is not None and fma_runs:
        gemms["peak_gflops"] = statistics.median(fma_runs)  # the same ISA, the same run
    prog.step("prefill GEMMs")
    print(file=sys.stderr)

    agg = report.aggregate(runs)
    bandwidth = statistics.median(bw_runs)
    machine = machine_info()
    hy_cases = [c.name for c in cases if c.name.startswith("hy-edge") and not report.side_case(c.name)]
    result = {
        "meta": {
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "model": "Hunyuan-0.5B-Instruct shapes, deterministic random weights"
            if args.layers == 24
            else f"Hunyuan-0.5B shapes cut to {args.layers} layers (smoke run)",
            "threads": args.threads,
            "rounds": args.rounds,
            "decode_tokens": args.decode_tokens,
            "decode_prompt": 16,
            "contention_tokens": CONTENTION_TOKENS,
            "context": 1024,
            "filled_contexts": FILLED_CONTEXTS,
            "quick": args.quick,
            "variants": VARIANTS + SUBBYTE_VARIANTS,
            "subbyte": args.subbyte,
            "machine": machine,
            "isa": isa,
            "host_isa": isa_mod.ISA,
            "case_isa": {c.name: c.isa for c in cases},
            "gguf": "llama.cpp convert_hf_to_gguf.py from the llama-cpp-python "
            f"{artifacts.LLAMA_CPP_PYTHON} sdist; tokenizer: SmolLM2's BPE padded to {artifacts.VOCAB} ids",
        },
        "bandwidth": {"numba_gbs": bandwidth, "numba_runs": bw_runs, "c_gbs": c_gbs},
        "fma_peak": {"gflops": statistics.median(fma_runs), "runs": fma_runs} if fma_runs else None,
        "prefill_gemms": gemms,
        "first_jit_s": first_jit_s,
        "bytes_per_token": bytes_per_token,
        "figures": agg["figures"],
        "flagged": agg["flagged"],
        "ratios": report.ratios(agg["figures"], hy_cases),
        "pi5": report.pi5_projection(
            {k: v for k, v in agg["figures"].items() if not k.endswith("+ busy")},
            bytes_per_token,
            bandwidth,
            gemms,
            report.a76_estimate(),
            # each float-input row capped by its kernel's Cortex-A76 estimate (bench/mca_blocks.py has none
            # for the integer-dot kernels: their rows are bandwidth alone)
            {
                f"hy-edge numba {label}": policy["format"]
                for label, policy in SUBBYTE_VARIANTS
                if policy.get("activations", "none") == "none"
            },
            report.a76_blocks(),
        ),
        "runs": runs,
        "notes": notes,
    }
    paths = report.write_outputs(result, out)
    summary_screen(result)
    print("\nwrote " + ", ".join(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p) for p in paths))


if __name__ == "__main__":
    main()
