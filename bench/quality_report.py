"""The quality race's outputs: a markdown table, the JSON record, and two charts (mean KL against MB read
per token, the Pareto plane; mean KL against decode tok/s), written to a temporary name and renamed."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("variant", "MB read / token", "file MB", "PPL ratio", "mean KL", "p99 KL", "top-1 agree")


def _speed_columns(rows: list[dict]) -> list[str]:
    return sorted({isa for r in rows for isa in r.get("decode_tps", {})})


def isa_names(doc: dict) -> str:
    """ "ISA avx512" when every runtime ran kernels for one ISA, else "ISA hy-edge avx512, llama.cpp avx2"."""
    isa = doc.get("isa", {})
    if len(set(isa.values())) == 1:
        return f"ISA {next(iter(isa.values()))}"
    return "ISA " + ", ".join(f"{k} {v}" for k, v in isa.items()) if isa else "ISA not recorded"


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    isas = _speed_columns(rows)
    head = [*COLUMNS, *(f"decode tok/s {isa}" for isa in isas)]
    lines = [
        f"Quality race, {doc['date']}, {doc['cpu']} ({isa_names(doc)}): {doc['model']}, {doc['text']} "
        f"({doc['text_tokens']} tokens, "
        f"{doc['predicted_tokens']} predicted, teacher-forced windows of {doc['window']}), against "
        f"{doc['reference']['variant']} (PPL {doc['reference']['perplexity']:.4f}, "
        f"{doc['reference']['mb_per_token']:.0f} MB / token). KL(reference || variant) per token. The "
        "reference's weights are the source file's own values in fp32: a variant that keeps them exactly "
        "differs from it only in how it computes."
        + "".join(
            f" Rows {', '.join(a['variants'])}: raced {a['date']} ({isa_names(a)})." for a in doc.get("added", [])
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in rows:
        speed = [f"{r['decode_tps'][isa]:.1f}" if isa in r["decode_tps"] else "" for isa in isas]
        cells = [
            r["variant"],
            f"{r['mb_per_token']:.1f}",
            f"{r['file_mb']:.1f}",
            f"{r['perplexity_ratio']:.4f}",
            f"{r['kl_mean']:.4f}",
            f"{r['kl_p99']:.4f}",
            f"{r['top1_agreement']:.2%}",
            *speed,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if isas:
        lines += ["", "decode tok/s: median of the speed race's runs (" + ", ".join(doc["speed_results"].values())
                  + "); empty where that race has no such row."]  # fmt: skip
        for isa, renamed in doc.get("speed_rows_renamed", {}).items():
            pairs = ", ".join(f"its '{a}' row measured what the speed race now calls '{b}'" for a, b in renamed.items())
            lines.append(f"smollm2-{isa}.json was recorded before --format source became the default: {pairs}.")
    return "\n".join(lines) + "\n"


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def chart(rows: list[dict], x_key, x_label: str, path: Path, title: str) -> bool:
    """Mean KL (log scale) against x_key(row); rows where that is None are left out. False: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # llama.cpp's F32 row checks the set-up (KL ~1e-6 at 4x the bytes); plotted, it squeezes every other point
    rows = [r for r in rows if r.get("llama_cpp_type") != "F32" and x_key(r) is not None]
    if not rows:
        return False
    # a log axis has no 0: a variant whose logits equal the reference's sits on a floor a decade below the rest
    positive = [r["kl_mean"] for r in rows if r["kl_mean"] > 0]
    floor = min(positive, default=1e-3) / 10
    points = [(x_key(r), r["kl_mean"] or floor, r) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for runtime, color, marker in (("hy-edge", "tab:blue", "o"), ("llama.cpp", "tab:orange", "s")):
        mine = [(x, y, r) for x, y, r in points if r["runtime"] == runtime]
        if mine:
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], c=color, marker=marker, label=runtime, zorder=3)
        for x, y, r in mine:
            label = r["variant"].removeprefix(runtime + " ") + (" (KL 0: the reference's logits)" if y == floor else "")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mean KL divergence vs fp32 (log scale; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _replace(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def write(doc: dict, md: str, results: Path, speed_isa: str = "avx2") -> None:
    results.mkdir(parents=True, exist_ok=True)
    _replace(results / "quality-race.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))
    _replace(results / "quality-race.md", lambda tmp: tmp.write_text(md))
    where = (f"SmolLM2-135M-Instruct, {doc['text_tokens']} tokens of {Path(doc['text']).name}\n{doc['date']}, "
             f"{doc['cpu']}, {isa_names(doc)}")  # fmt: skip
    chart(doc["rows"], lambda r: r["mb_per_token"], "weight MB read per decoded token",
          results / "quality-race-kl-bytes.png", f"mean KL against bytes per token: {where}")  # fmt: skip
    chart(doc["rows"], lambda r: r["decode_tps"].get(speed_isa), f"decode tok/s ({speed_isa}, speed race)",
          results / "quality-race-kl-speed.png", f"mean KL against decode speed: {where}")  # fmt: skip


def main() -> None:
    """Re-renders the table and charts from a recorded quality-race.json (e.g. after a format change)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", type=Path, nargs="?", default=Path(__file__).parent / "results" / "quality-race.json")
    ap.add_argument("--speed-isa", default="avx2")
    args = ap.parse_args()
    doc = json.loads(args.json.read_text())
    md = markdown(doc)
    print(md)
    write(doc, md, args.json.parent, args.speed_isa)


if __name__ == "__main__":
    main()
