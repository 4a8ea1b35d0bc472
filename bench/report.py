"""Turn the bench's measurements into figures: median and min-max per runtime x figure, the ratios
hy-edge / llama.cpp Q8_0, the Raspberry Pi 5 projection, and the three outputs (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the Cortex-A76 kernel estimate `make test-arm` writes: llvm-mca on the hot loops numba compiles on the
# emulated Pi (bench/kernel_asm.py, bench/mca.py)
A76_ESTIMATE = HERE / "results" / "cortex-a76" / "mca-neoverse-n1.json"
A76_BLOCKS = HERE / "results" / "cortex-a76" / "mca-blocks-neoverse-n1.json"  # bench/mca_blocks.py --json
SUBBYTE_BITS = {"e2m1": 4.5, "e2m3": 6.5, "e3m2": 6.5}  # bits a weight read, its half scale per 32 included

OTHER_CPU_FLAG = 0.25  # other processes used > a quarter of one core on average during the run

# Raspberry Pi 5, published figures: 4x Cortex-A76 at 2.4 GHz, 2x128-bit NEON FMA pipes per core
# (16 fp32 FLOP/cycle), ~10-13 GB/s usable read bandwidth (LPDDR4X-4267); llama.cpp Q8_0 decodes a
# 0.5B model at ~20 tok/s there. The seed article claims a first token in under 1.2 s.
PI5 = {"cores": 4, "ghz": 2.4, "flop_per_cycle": 16, "bandwidth_gbs": (10.0, 13.0), "llama_q8_tok_s": 20.0}
SEED_TTFT_CLAIM_S = 1.2


BATCH_SUFFIX = ", 4 sequences batched"  # run.py's name for a case measuring the batch4 figure


def side_case(case: str) -> bool:
    """Cases outside the main table: decode beside a busy process, peak RSS with the context filled,
    batched decode."""
    return case.endswith("+ busy") or case.endswith(" filled") or case.endswith(BATCH_SUFFIX)


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
    """runs: one dict per child process {"case", "round", "ready_s", "result" | "error"} ->
    {case: {figure: summary}} plus the list of runs flagged for other processes' CPU time."""
    by_case: dict[str, dict[str, list[float]]] = {}
    flagged = []
    for run in runs:
        if "result" not in run:
            continue
        figs = by_case.setdefault(run["case"], {})
        figs.setdefault("cold_start_s", []).append(run["ready_s"])
        for name, fig in run["result"].items():
            if name == "peak_rss_mb":
                figs.setdefault(name, []).append(fig)
                continue
            figs.setdefault(name, []).append(fig["value"])
            share = fig["other_cpu_s"] / fig["wall_s"] if fig["wall_s"] > 0 else 0.0
            if share > OTHER_CPU_FLAG and not run.get("contention"):
                flagged.append({"case": run["case"], "round": run["round"], "figure": name, "other_cpu_cores": share})
    return {
        "figures": {case: {k: summarize(v) for k, v in figs.items()} for case, figs in by_case.items()},
        "flagged": flagged,
    }


def ratios(figures: dict, hy_edge: list[str], reference: str = "llama.cpp Q8_0") -> dict:
    """hy-edge / llama.cpp Q8_0 on medians: decode (>1 is faster), TTFT and RSS (<1 is faster/smaller)."""
    ref = figures.get(reference)
    out = {}
    if ref is None:
        return out
    for case in hy_edge:
        mine = figures.get(case)
        if mine is None:
            continue
        out[case] = {
            key: mine[key]["median"] / ref[key]["median"]
            for key in ("decode", "ttft128", "ttft512", "peak_rss_mb")
            if key in mine and key in ref
        }
    return out


def a76_estimate(path: Path = A76_ESTIMATE) -> dict | None:
    """The static estimate of the kernels on a Cortex-A76, or None when `make test-arm` has not made one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def a76_blocks(path: Path = A76_BLOCKS) -> dict | None:
    """The static estimate of the block kernels (bench/mca_blocks.py --json), or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pi5_projection(
    figures: dict,
    bytes_per_token: dict,
    bandwidth_gbs: float,
    gemms: dict | None,
    a76: dict | None,
    storages: dict | None = None,
    blocks: dict | None = None,
) -> dict:
    """Decode: the bandwidth efficiency measured here applied to the Pi's bandwidth, unless the kernels'
    estimated speed on the Pi's 4 cores is lower (then that). TTFT: scaled by the prefill GEMMs' speed here
    (measured) against the A76 estimate of the same microkernel on 4 cores."""
    out: dict = {"bandwidth_here_gbs": bandwidth_gbs, "cases": {}, "a76": a76 is not None}
    pi_peak = PI5["cores"] * PI5["ghz"] * PI5["flop_per_cycle"]
    if a76 is not None:
        k = a76["kernels"]
        out["gemv_gbs"] = PI5["cores"] * k["gemv"]["fp8_gbs_per_core"] * PI5["ghz"] / a76["ghz"]
        out["pi_gemm_gflops"] = PI5["cores"] * k["prefill"]["flops_per_cycle"] * PI5["ghz"]
    else:  # no estimate: the same fraction of peak as here
        out["pi_gemm_gflops"] = pi_peak * (gemms["gemm_gflops"] / gemms["peak_gflops"]) if gemms and gemms.get(
            "peak_gflops") else None  # fmt: skip
    out["here_gemm_gflops"] = gemms["gemm_gflops"] if gemms else None
    for case, figs in figures.items():
        if "decode" not in figs or case not in bytes_per_token:
            continue
        b = bytes_per_token[case]
        achieved = figs["decode"]["median"] * b / 1e9
        eff = achieved / bandwidth_gbs
        rates = [eff * bw for bw in PI5["bandwidth_gbs"]]
        storage = (storages or {}).get(case)
        if storage and blocks and storage in blocks["storages"]:  # sub-byte: its own kernel's estimate
            row = blocks["storages"][storage]["gemv"]
            cap = PI5["cores"] * row["gweights_per_core"] * PI5["ghz"] / blocks["ghz"] * SUBBYTE_BITS[storage] / 8
            rates = [min(r, cap) for r in rates]
        elif "gemv_gbs" in out and case.startswith("hy-edge numba"):  # the kernels may not keep up
            rates = [min(r, out["gemv_gbs"]) for r in rates]
        row = {
            "bytes_per_token": b,
            "achieved_gbs": achieved,
            "efficiency": eff,
            "decode_tok_s": [r * 1e9 / b for r in rates],
        }
        scale = (
            out["here_gemm_gflops"] / out["pi_gemm_gflops"]
            if out["here_gemm_gflops"] and out["pi_gemm_gflops"]
            else None
        )
        for key in ("ttft32", "ttft128", "ttft512"):
            if key in figs and scale and case.startswith("hy-edge numba"):
                row[key + "_s"] = figs[key]["median"] * scale
        out["cases"][case] = row
    return out


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _fmt(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(result: dict) -> str:
    figs, meta = result["figures"], result["meta"]
    bw = result["bandwidth"]
    lines = [
        f"# hy-edge bench, {meta['date']}",
        "",
        f"{meta['model']}; {meta['threads']} threads; {meta['rounds']} interleaved round(s), each runtime in a fresh "
        f"process; decode over {meta['decode_tokens']} tokens after a {meta['decode_prompt']}-token prompt; "
        f"KV cache for {meta['context']} tokens. Median (min–max) over rounds.",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores at {meta['machine']['ghz']:.2f} GHz, "
        f"{meta['machine']['mem_gb']:.0f} GB; flags: {' '.join(meta['machine']['flags'])}.",
        "",
        _isa_line(meta),
        "",
        "| runtime | ISA | decode tok/s | TTFT 32 (s) | TTFT 128 (s) | TTFT 512 (s) | peak RSS (MB) | cold start (s) "
        "| weight MB/token | decode GB/s (% of read bw) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, f in figs.items():
        if side_case(case):
            continue
        b = result["bytes_per_token"].get(case)
        gbs = f"{f['decode']['median'] * b / 1e9:.2f} ({100 * f['decode']['median'] * b / 1e9 / bw['numba_gbs']:.0f}%)"
        lines.append(
            f"| {case} | {meta.get('case_isa', {}).get(case, '-')} | {_fmt(f.get('decode'), 1)} "
            f"| {_fmt(f.get('ttft32'))} | {_fmt(f.get('ttft128'))} "
            f"| {_fmt(f.get('ttft512'))} | {_fmt(f.get('peak_rss_mb'), 0)} | {_fmt(f.get('cold_start_s'), 1)} "
            f"| {b / 1e6:.0f} | {gbs if 'decode' in f else '-'} |"
        )
    busy = [c for c in figs if c.endswith("+ busy")]
    if busy:
        lines += [
            "",
            f"**Decode under contention** (one competing busy process, a Python spin loop, on the machine; "
            f"{meta['contention_tokens']} tokens):",
            "",
            "| runtime | decode tok/s alone | with one busy process | slowdown |",
            "|---|---|---|---|",
        ]
        for c in busy:
            alone = figs.get(c[: -len(" + busy")], {}).get("decode")
            mine = figs[c]["decode"]
            slow = f"{alone['median'] / mine['median']:.2f}×" if alone else "-"
            lines.append(f"| {c[: -len(' + busy')]} | {_fmt(alone, 1)} | {_fmt(mine, 1)} | {slow} |")
    lines += _filled_markdown(figs, meta)
    lines += _batch_markdown(figs, meta)
    if result["ratios"]:
        lines += ["", "**hy-edge ÷ llama.cpp Q8_0** (medians; decode > 1 is faster, TTFT and RSS < 1 are better):", ""]
        lines += ["| hy-edge | decode | TTFT 128 | TTFT 512 | peak RSS |", "|---|---|---|---|---|"]
        for case, r in result["ratios"].items():
            cells = [f"{r[k]:.2f}×" if k in r else "-" for k in ("decode", "ttft128", "ttft512", "peak_rss_mb")]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Read bandwidth**: {bw['numba_gbs']:.1f} GB/s (median of {len(bw['numba_runs'])} runs of the numba reader, "
        f"{meta['threads']} threads, min–max {min(bw['numba_runs']):.1f}–{max(bw['numba_runs']):.1f}); the C "
        f"reference (bench/bandwidth.c, gcc -O3 -march=native -fopenmp) read "
        + (f"{bw['c_gbs']:.1f} GB/s in the same run." if bw.get("c_gbs") else "nothing (not built).")
        + " Decode GB/s = weight bytes read per token × tok/s.",
    ]
    lines += _peak_lines(result)
    if result.get("first_jit_s") is not None:
        lines += [
            "",
            f"**First-ever JIT compile** (hy-edge numba, empty kernel cache, process start → ready): "
            f"{result['first_jit_s']:.1f} s; the cold starts above use the warm cache.",
        ]
    if result["flagged"]:
        lines += ["", "**Runs where other processes used > 25% of a core** (treat these numbers with care):", ""]
        for f in result["flagged"]:
            lines.append(f"- {f['case']}, round {f['round']}, {f['figure']}: {f['other_cpu_cores']:.2f} cores")
    else:
        lines += ["", "No run saw other processes use more than 25% of a core."]
    lines += _pi_markdown(result.get("pi5"))
    if result.get("notes"):
        lines += ["", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def _isa_line(meta: dict) -> str:
    isa, host = meta.get("isa", "?"), meta.get("host_isa", "?")
    if isa == host:
        return f"Vector ISA: **{isa}** (this host's own)."
    return (
        f"Vector ISA: **{isa}**, compiled for on this {host} host: hy-edge's kernels by numba with the host CPU's "
        f"{host} features off, llama.cpp from a llama-cpp-python build for {isa}; the ISA column says what each "
        "row ran."
    )


def _peak_lines(result: dict) -> list[str]:
    peak, gemms = result.get("fma_peak"), result.get("prefill_gemms")
    if not peak:
        return []
    runs = peak["runs"]
    lines = [
        "",
        f"**FMA peak** ({result['meta'].get('isa', '?')} code, bench/fma_peak.c, {result['meta']['threads']} threads): "
        f"{peak['gflops']:.1f} GFLOP/s (median of {len(runs)}, {min(runs):.1f}–{max(runs):.1f}).",
    ]
    if gemms:
        lines[-1] += (
            f" The GEMMs of a 128-token prefill alone (bench/decode_step.py --prefill 128, hy-edge numba default) ran "
            f"at {gemms['gemm_gflops']:.1f} GFLOP/s = **{100 * gemms['gemm_gflops'] / peak['gflops']:.0f}% of that "
            f"peak**, {gemms['gemm_ms']:.0f} of the prefill's {gemms['step_ms']:.0f} ms."
        )
    return lines


def _batch_markdown(figs: dict, meta: dict) -> list[str]:
    """Aggregate decode of 4 sequences in one process (decode_batch: one pass over the weights per step)
    against the same runtime's one-sequence decode of the same run (issue 8's target: >= 2.5x)."""
    cases = [c for c in figs if c.endswith(BATCH_SUFFIX)]
    if not cases:
        return []
    lines = [
        "",
        f"**Batched decode** (one process, 4 sequences each after its own {meta['decode_prompt']}-token prompt, "
        f"{meta['decode_tokens']} `decode_batch` steps; aggregate tokens/s against the same runtime's decode of one "
        "sequence above):",
        "",
        "| runtime | 4 sequences: tok/s | 1 sequence: tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for c in cases:
        base = c[: -len(BATCH_SUFFIX)]
        four, one = figs[c].get("batch4"), figs.get(base, {}).get("decode")
        ratio = f"{four['median'] / one['median']:.2f}×" if four and one else "-"
        lines.append(f"| {base} | {_fmt(four, 1)} | {_fmt(one, 1)} | {ratio} |")
    return lines


def _filled_markdown(figs: dict, meta: dict) -> list[str]:
    """Peak RSS after the whole context is cached (prefill of context - 1 tokens, then a step), beside
    the bench workload's (which caches at most 512 positions of its 1,024)."""
    contexts = meta.get("filled_contexts", ())
    names = list(dict.fromkeys(c.rsplit(" @ ", 1)[0] for c in figs if c.endswith(" filled")))
    if not names:
        return []
    ref = "llama.cpp Q8_0"
    head = " | ".join(f"{n:,} filled: RSS MB (÷ {ref}) · prefill s" for n in contexts)
    lines = [
        "",
        "**Peak RSS with the context filled** (a fresh process allocates the context, prefills context − 1 tokens "
        "and decodes one; its peak RSS, and the time that took):",
        "",
        f"| runtime | bench workload, 1,024 context: RSS MB | {head} |",
        "|---|---|" + "---|" * len(contexts),
    ]
    for name in names:
        cells = [_fmt(figs.get(name, {}).get("peak_rss_mb"), 0)]
        for n in contexts:
            mine = figs.get(f"{name} @ {n} filled", {})
            theirs = figs.get(f"{ref} @ {n} filled", {}).get("peak_rss_mb")
            if "peak_rss_mb" not in mine:
                cells.append("-")
                continue
            ratio = f" ({mine['peak_rss_mb']['median'] / theirs['median']:.2f}×)" if theirs else ""
            cells.append(f"{_fmt(mine['peak_rss_mb'], 0)}{ratio} · {_fmt(mine.get('fill'), 1)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _pi_markdown(pi: dict | None) -> list[str]:
    if not pi or not pi["cases"]:
        return []
    lo, hi = PI5["bandwidth_gbs"]
    if pi["a76"]:
        how = (
            f"The kernels' speed on the Pi is the static estimate `make test-arm` makes of their hot loops as numba "
            "compiles them on an emulated Cortex-A76 (llvm-mca's Neoverse-N1 model, "
            f"bench/{A76_ESTIMATE.relative_to(HERE)}): "
            f"the one-token GEMV at {pi['gemv_gbs']:.1f} GB/s of FP8 weights on {PI5['cores']} cores, the prefill "
            f"microkernel at {pi['pi_gemm_gflops']:.0f} GFLOP/s. "
        )
    else:
        how = "No Cortex-A76 estimate (`make test-arm` makes it): the Pi's GEMMs at the same fraction of peak as here. "
    gemm = f"{pi['here_gemm_gflops']:.0f}" if pi.get("here_gemm_gflops") else "?"
    lines = [
        "",
        "## Raspberry Pi 5 projection",
        "",
        how + f"Decode: Pi tok/s = (GB/s achieved here ÷ {pi['bandwidth_here_gbs']:.1f} GB/s measured here) × Pi "
        f"bandwidth ({lo:.0f}–{hi:.0f} GB/s), or the GEMV estimate where lower, ÷ weight bytes per token. TTFT: "
        f"TTFT here × the prefill GEMMs' {gemm} GFLOP/s here ÷ the Pi estimate (the rest of a prefill assumed to scale "
        "alike). Estimates of the loops from L1: read them as upper ends.",
        "",
        "| runtime | GB/s here | efficiency | Pi decode tok/s | Pi TTFT 32 / 128 / 512 (s) |",
        "|---|---|---|---|---|",
    ]
    for case, r in pi["cases"].items():
        tt = " / ".join(f"{r[k + '_s']:.2f}" if k + "_s" in r else "-" for k in ("ttft32", "ttft128", "ttft512"))
        lines.append(
            f"| {case} | {r['achieved_gbs']:.2f} | {100 * r['efficiency']:.0f}% | "
            f"{r['decode_tok_s'][0]:.1f}–{r['decode_tok_s'][1]:.1f} | {tt} |"
        )
    ref = pi["cases"].get("llama.cpp Q8_0")
    if ref:
        lines += [
            "",
            f"Check of the method: it gives llama.cpp Q8_0 {ref['decode_tok_s'][0]:.1f}–{ref['decode_tok_s'][1]:.1f} "
            f"tok/s on a Pi 5, against the ~{PI5['llama_q8_tok_s']:.0f} tok/s published for 0.5B Q8_0 models.",
        ]
    lines += [
        "",
        f"The seed article claims a first token in under {SEED_TTFT_CLAIM_S} s on the Pi; the projected TTFT "
        "for a 128-token prompt is in the table (the claim does not state a prompt length).",
    ]
    return lines


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {c: f for c, f in result["figures"].items() if not side_case(c)}
    cases = list(figs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(cases) + 2), sharey=True)
    y = range(len(cases))
    colors = ["tab:blue" if c.startswith("hy-edge") else "tab:gray" for c in cases]
    dec = [figs[c].get("decode") for c in cases]
    med = [d["median"] if d else 0 for d in dec]
    err = [[d["median"] - d["min"] if d else 0 for d in dec], [d["max"] - d["median"] if d else 0 for d in dec]]
    ax1.barh(list(y), med, xerr=err, color=colors)
    for i, m in enumerate(med):
        ax1.text(m, i, f" {m:.1f}", va="center")
    ax1.set_yticks(list(y), cases)
    ax1.invert_yaxis()
    ax1.set_xlabel("decode tokens/s (higher is better)")
    width = 0.27
    for k, (key, shade) in enumerate((("ttft32", 0.35), ("ttft128", 0.65), ("ttft512", 1.0))):
        vals = [figs[c][key]["median"] if key in figs[c] else 0 for c in cases]
        ax2.barh([i + (k - 1) * width for i in y], vals, height=width, alpha=shade, color="tab:orange", label=key)
    ax2.set_xlabel("time to first token, s (lower is better)")
    ax2.legend(["32 tokens", "128 tokens", "512 tokens"], loc="best")
    meta = result["meta"]
    fig.suptitle(f"{meta['model']}, {meta['threads']} threads, median of {meta['rounds']} rounds ({meta['date']})")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(result: dict, prefix: Path) -> list[Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_suffix(".json"), prefix.with_suffix(".md")]
    write_atomic(paths[0], json.dumps(result, indent=1, default=str))
    write_atomic(paths[1], markdown(result))
    try:
        chart(result, prefix.with_suffix(".png"))
        paths.append(prefix.with_suffix(".png"))
    except ImportError:
        print("bench: matplotlib is not installed, no chart (pip install -e '.[bench]')")
    return paths
