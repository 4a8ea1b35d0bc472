"""Decode speed of every supported family at its small model's full size (random weights), as GB/s of
weights read per token, beside Hunyuan-0.5B's: what a new family costs the engine beyond its bytes.

Each model is converted once (E4M3 per channel, rounded to nearest: the random checkpoints have no
tokenizer to calibrate with) into bench/out; each round runs every model in a fresh process
(bench/runners.py, greedy decode after a 16-token prompt), the models interleaved, and the figures are
the medians over the rounds. GB/s = weight bytes one decode step reads (artifacts.hy_edge_bytes_per_token)
x tokens per second.

    python bench/families.py [--rounds 3] [--tokens 64] [--threads 2] [--isa native|avx2] [--json FILE]

Writes bench/results/families[-avx2].json with the date, CPU, ISA and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import artifacts
from make_random_hunyuan import FAMILY_CONFIGS

HERE = Path(__file__).resolve().parent
BASELINE = "hunyuan-0.5b"
POLICY = {"rounding": "nearest", "scales": "amax"}  # E4M3 per channel, the converter's other defaults


def family_checkpoint(name: str) -> Path:
    if name == BASELINE:
        return artifacts.checkpoint()
    ckpt = artifacts.OUT / f"{name}-random"
    if not (ckpt / "model.safetensors").exists():
        cmd = [sys.executable, str(HERE / "make_random_hunyuan.py"), str(ckpt), "--family", name]
        subprocess.run(cmd, check=True)
    return ckpt


def decode_tok_s(model: Path, args, env: dict) -> float:
    cmd = [sys.executable, str(HERE / "runners.py"), "numba", str(model), "--threads", str(args.threads)]
    cmd += ["--figures", "decode", "--decode-tokens", str(args.tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{model.name}: exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["decode"]["value"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--families", default=",".join([BASELINE, *FAMILY_CONFIGS]))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.families.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.isa != "native":
        from hy_edge_ops.isa import codegen_env

        env.update(codegen_env(args.isa))
    models = {n: artifacts.hy_edge_model(family_checkpoint(n), POLICY) for n in names}
    per_token = {n: artifacts.hy_edge_bytes_per_token(m) for n, m in models.items()}
    where = artifacts.where_measured()  # the load before the runs
    runs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.rounds):
        for n in names:
            runs[n].append(decode_tok_s(models[n], args, env))
        print(f"round {i + 1}: " + ", ".join(f"{n} {runs[n][-1]:.1f} tok/s" for n in names), flush=True)
    rows = {}
    for n in names:
        tok_s = statistics.median(runs[n])
        rows[n] = {"tok_s": tok_s, "mb_per_token": per_token[n] / 1e6, "gb_s": tok_s * per_token[n] / 1e9}
    base = rows.get(BASELINE)
    print(f"{'model':<14} {'MB/token':>9} {'tok/s':>7} {'GB/s':>6}  vs {BASELINE}")
    for n, r in rows.items():
        ratio = f"{r['gb_s'] / base['gb_s']:.2f}x" if base else ""
        print(f"{n:<14} {r['mb_per_token']:9.1f} {r['tok_s']:7.1f} {r['gb_s']:6.2f}  {ratio}")
    isa = where["isa"] if args.isa == "native" else args.isa
    doc = {**where, "isa": isa, "threads": args.threads, "tokens": args.tokens, "policy": POLICY}
    out = args.json or HERE / "results" / f"families{'' if args.isa == 'native' else '-' + args.isa}.json"
    artifacts.write_json(out, {**doc, "median": rows, "runs": runs})


if __name__ == "__main__":
    main()
