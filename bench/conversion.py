"""What a conversion costs: wall time, peak RSS and output size of `hy-edge convert`, each in a fresh
process, for the sources the README's conversion table names -- the Hunyuan-0.5B shapes with random
weights (bf16, and the compressed-tensors FP8 layout), with and without the FP8 head copy, and the
bundled SmolLM2 GGUF (blocks kept, re-quantized to E4M3, and with the calibrated rounding; the random
Hunyuan checkpoint has no tokenizer to calibrate with).

    python bench/conversion.py [--only NAME ...]

Writes bench/results/conversion.{json,md} (date, CPU, ISA, load average); the checkpoints are made under
bench/out by make_random_hunyuan.py when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import artifacts  # noqa: E402
from run import machine_info  # noqa: E402

RESULTS = HERE / "results"


def fp8_checkpoint() -> Path:
    ckpt = artifacts.OUT / "hunyuan-0.5b-random-fp8"
    if not (ckpt / "model.safetensors").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_hunyuan.py"), str(ckpt), "--fp8"], check=True)
    return ckpt


def smollm2() -> Path:
    from edge_runtime.cli.model import default_gguf

    return Path(default_gguf())


# name -> (source, convert options)
CASES = {
    # with a tokenizer (the bench's synthetic one) the default rounding is calibrated: gptq, searched scales
    "hunyuan bf16 + tokenizer (default: gptq+search)": (lambda: artifacts.gguf_source(artifacts.checkpoint()), []),
    "hunyuan bf16 + tokenizer --rounding nearest": (
        lambda: artifacts.gguf_source(artifacts.checkpoint()),
        ["--rounding", "nearest"],
    ),
    "hunyuan bf16 + tokenizer --rounding nearest --lm-head-fp16": (
        lambda: artifacts.gguf_source(artifacts.checkpoint()),
        ["--rounding", "nearest", "--lm-head-fp16"],
    ),
    "hunyuan FP8 (compressed-tensors)": (fp8_checkpoint, []),
    "smollm2 Q4_1 GGUF (blocks kept)": (smollm2, []),
    "smollm2 Q4_1 GGUF --format e4m3 --rounding nearest": (smollm2, ["--format", "e4m3", "--rounding", "nearest"]),
    "smollm2 Q4_1 GGUF --format e4m3 (default: gptq+search)": (smollm2, ["--format", "e4m3"]),
}


def measure(src: Path, options: list[str], out_dir: Path) -> dict:
    """One conversion in a fresh process: wall seconds, the child's peak RSS, the output's bytes."""
    out = out_dir / "model.onnx"
    cmd = [sys.executable, "-m", "edge_runtime", "convert", str(src), "-o", str(out), *options]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        last = (err.strip().splitlines() or ["(no message)"])[-1]
        sys.exit(f"conversion: {' '.join(cmd)} failed: {last}")
    size = out.stat().st_size + Path(str(out) + ".data").stat().st_size
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "output_mb": round(size / 1e6, 1),
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Conversions, {doc['date']}, {m.get('cpu')} ({doc['isa']}), load average {doc['load_before']}: "
        "`hy-edge convert SRC -o OUT.onnx [options]`, each in a fresh process (wall time, peak RSS of the process).",
        "",
        "| source and options | source MB | output MB | time (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in doc["cases"].items():
        lines.append(f"| {name} | {r['source_mb']} | {r['output_mb']} | {r['seconds']} | {r['peak_rss_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CASES), help="measure only these cases")
    args = ap.parse_args()
    from hy_edge_ops.isa import ISA

    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    cases = {}
    for name in args.only or CASES:
        make, options = CASES[name]
        src = make()
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        with tempfile.TemporaryDirectory(dir=artifacts.OUT) as tmp:
            r = measure(src, options, Path(tmp))
        cases[name] = {"source": str(src.name), "options": options,
                       "source_mb": round(sum(p.stat().st_size for p in files) / 1e6, 1), **r}  # fmt: skip
        print(f"{name}: {cases[name]}", file=sys.stderr)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "isa": ISA,
        "load_before": load_before,
        "machine": machine_info(),
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=1) + "\n"), ("md", markdown(doc))):
        dst = RESULTS / f"conversion.{suffix}"
        tmp = dst.with_name(dst.name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, dst)
    print(markdown(doc))


if __name__ == "__main__":
    main()
