"""`hy-edge convert` and `hy-edge info`. The converter is imported lazily: the runtime never needs it."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from hy_edge_format import format as F
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.safe_json import is_number

from ..engine.memory import peak_rss_mb
from ..engine.model_file import read_header
from ..integrity import check_data_size, stored_checksums, verify_checksums
from .common import user_errors


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _ratio(source: int, size: int) -> str:
    """'2.10x smaller' or '1.69x larger' (an FP8 file from a Q4 GGUF is larger than its source)."""
    if not source or not size:
        return "size ratio unknown"
    return f"{source / size:.2f}x smaller" if size <= source else f"{size / source:.2f}x larger"


def _pattern_format(text: str) -> tuple[str, str]:
    pattern, sep, fmt = text.rpartition("=")
    if not sep or not pattern or not fmt:
        raise HyEdgeError(f"--tensor-format: '{text}' is not PATTERN=FORMAT")
    return pattern, fmt


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .onnx file (its weights go to OUTPUT.data beside it).",
)
@click.option(
    "--format",
    "fmt",
    default="source",
    show_default=True,
    type=click.Choice(["source", "e4m3", "e5m2", "auto", "none", "e2m1", "e3m2", "e2m3"]),
    help="source keeps quantized sources exactly (FP8 releases; GGUF Q8_0/Q4_0/Q4_1 blocks) and makes "
    "float weights E4M3; e4m3/e5m2 (re)quantize every linear weight to that FP8 format, auto picks one per "
    "tensor; e2m1 (FP4), e3m2 and e2m3 (FP6) quantize them below eight bits, a half scale per block of 32; "
    "none keeps fp32.",
)
@click.option(
    "--granularity",
    default="channel",
    show_default=True,
    help="Scales per output channel, per tensor, or per block of N inputs (block:N).",
)
@click.option(
    "--keep-fp16",
    "keep",
    multiple=True,
    metavar="PATTERN",
    help="Also keep weights matching this glob in FP16 (a float embedding always is).",
)
@click.option(
    "--tensor-format",
    "tensor_formats",
    multiple=True,
    metavar="PATTERN=FORMAT",
    help="Linear weights matching this glob take FORMAT (e4m3, e5m2, auto, e2m1, e3m2, e2m3) instead of "
    "--format's, e.g. 'lm_head.weight=e4m3'; the first matching pattern wins.",
)
@click.option(
    "--bits",
    type=float,
    default=None,
    help="With --format auto: the average bits per weight of the linear weights, each one's format (FP4 e2m1, "
    "FP6 e2m3, FP8 e4m3) chosen by how much the calibration text's predictions suffer from it.",
)
@click.option(
    "--lm-head-fp8/--lm-head-fp16",
    default=True,
    show_default=True,
    help="A tied lm_head gets its own FP8 copy (decode reads it every token), or stays the FP16 embedding.",
)
@click.option(
    "--activations",
    default="none",
    show_default=True,
    type=click.Choice(["none", "e4m3", "e5m2", "static", "q8"]),
    help="Fake-quantize linear inputs (static: the checkpoint's input_scale); q8: round the inputs of the "
    "FP4 / FP6 E2M3 linears to int8 per block of 32 (llama.cpp's way), whose kernels then multiply in integers.",
)
@click.option(
    "--rounding",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "nearest", "gptq"]),
    help="FP8 rounding of float weights: nearest (each weight on its own), gptq (each input column's rounding "
    "error spread onto the columns after it, weighted by the inputs of a bundled calibration text), or auto "
    "(gptq where the checkpoint has a tokenizer, else nearest).",
)
@click.option(
    "--scales",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "amax", "search"]),
    help="FP8 scales: amax (the largest value maps onto the format's), search (the multiple of amax with "
    "the least error, weighted by the calibration text's inputs), or auto (search with gptq, amax with nearest).",
)
def convert_cmd(
    src: Path,
    out: Path,
    fmt: str,
    granularity: str,
    keep: tuple[str, ...],
    tensor_formats: tuple[str, ...],
    bits: float | None,
    lm_head_fp8: bool,
    activations: str,
    rounding: str,
    scales: str,
) -> None:
    """Convert a Hugging Face checkpoint directory or a GGUF file to one ONNX file."""
    with user_errors():
        from hy_edge_convert import QuantPolicy, convert

        policy = QuantPolicy(
            format=fmt,
            granularity=granularity,
            keep_fp16=(F.EMBED, *keep),
            tensor_formats=tuple(_pattern_format(t) for t in tensor_formats),
            bits=bits,
            lm_head_fp8=lm_head_fp8,
            activations=activations,
            rounding=rounding,
            scales=scales,
        )
        bar = None

        def progress(name: str, i: int, total: int) -> None:
            nonlocal bar
            if bar is None:  # only once the source has been read: a bad input prints its error alone
                bar = click.progressbar(
                    length=total, label="converting", file=sys.stderr, item_show_func=lambda n: n and n[-48:]
                )
                bar.__enter__()
            bar.update(1, name)

        try:
            report = convert(src, out, policy, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        size = report.onnx_bytes + report.data_bytes
        worst, err = report.worst
        click.echo(
            f"wrote {out} ({_mb(size)}; source {_mb(report.source_bytes)}, "
            f"{_ratio(report.source_bytes, size)}) in {report.seconds:.1f} s"
        )
        click.echo("tensors: " + ", ".join(f"{n} {k}" for k, n in report.counts.items()))
        notes: dict[str, int] = {}
        for t in report.tensors.values():
            if t.get("note"):
                notes[t["note"]] = notes.get(t["note"], 0) + 1
        for note, n in notes.items():  # an option not applied as asked is never silent
            click.echo(f"hy-edge: note: {note} ({n} tensors; see 'note' in the quantization report)", err=True)
        for note in report.notes:
            click.echo(f"hy-edge: note: {note}", err=True)
        if worst:
            click.echo(f"worst FP8 relative error: {err:.4f} ({worst})")
        click.echo(f"peak RSS: {peak_rss_mb():.0f} MB")


@click.command("info")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--verify", is_flag=True, help="Check every weight tensor against its stored checksum.")
@click.option(
    "--default-model-path", "default_path", is_flag=True, help="Print the bundled default model's GGUF file and exit."
)
def info_cmd(model: Path | None, verify: bool, default_path: bool) -> None:
    """Print the spec, quantization and sizes of a converted model."""
    with user_errors():
        if default_path:  # the package is installed without its dependencies: found, never imported
            from .model import default_gguf

            click.echo(default_gguf())
            return
        if model is None:
            raise HyEdgeError("info needs a MODEL (a converted .onnx), or --default-model-path")
        header = read_header(model)
        spec, quant, meta, proto = header.spec, header.quantization, header.meta, header.proto
        check_data_size(proto, model)  # a truncated data file is an error, not a size
        checked = verify_checksums(proto, model) if verify else None
        data = model.with_name(model.name + ".data")
        size = model.stat().st_size + (data.stat().st_size if data.exists() else 0)
        click.echo(f"{model}: hy-edge format {meta.get(F.META_FORMAT)}, {_mb(size)}")
        click.echo(
            f"architecture: {spec.model_type}, {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, "
            f"heads {spec.num_attention_heads}/{spec.num_key_value_heads} x {spec.head_dim}, "
            f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}, "
            f"act {spec.hidden_act}, tied {spec.tie_word_embeddings}"
        )
        qk_norm = ("before RoPE" if spec.qk_norm_before_rope else "after RoPE") if spec.use_qk_norm else "none"
        click.echo(
            f"rope base {spec.rope_theta:.6g}{', llama3 scaling' if spec.rope_llama3 else ''}"
            f"{f', linear scaling x{spec.rope_linear:g}' if spec.rope_linear != 1.0 else ''}, qk-norm {qk_norm}, "
            f"q/k/v bias {spec.qkv_bias}, context {spec.max_position_embeddings}"
        )
        if spec.sliding_layers:
            click.echo(
                f"sliding-window layers {list(spec.sliding_layers)} (window {spec.sliding_window}, "
                f"rope base {spec.rope_local_theta:.6g})"
            )
        if spec.conv_layers:
            click.echo(f"dwconv layers {list(spec.conv_layers)} (kernel {spec.conv_kernel_size})")
        shared = {i: j for i, j in enumerate(spec.shared_layers) if i != j}
        if shared:
            click.echo(f"shared layers (layer: owner): {shared}")
        # the converter's report, informational: entries of another shape are left out
        tensors = {n: t for n, t in quant.get("tensors", {}).items() if isinstance(t, dict)}
        counts: dict[str, int] = {}
        for t in tensors.values():
            counts[str(t.get("storage"))] = counts.get(str(t.get("storage")), 0) + 1
        click.echo(
            f"quantization: format {str(quant.get('format'))[:20]}, granularity {str(quant.get('granularity'))[:20]}, "
            f"activations {quant.get('activations', 'none')}"
            + "".join(f", {k} {str(quant[k])[:20]}" for k in ("bits", "rounding", "scales") if k in quant)
            + "; tensors: "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        )
        from hy_edge_format.sizes import fmt_bytes

        from ..engine.buffers import memory_plan
        from ..engine.memory import DEFAULT_BUDGET
        from ..engine.numba_session import DEFAULT_PREFILL_CHUNK

        weights = data.stat().st_size if data.exists() else 0
        plan = memory_plan(spec, weights, DEFAULT_PREFILL_CHUNK, quant.get("activations", "none") != "none")
        allowed = min(plan.max_context(DEFAULT_BUDGET), spec.max_position_embeddings)
        click.echo(
            f"memory (numba backend): runtime ~{fmt_bytes(plan.runtime)} + weights up to {fmt_bytes(weights)} mapped + "
            f"buffers {fmt_bytes(plan.fixed)} + KV cache {fmt_bytes(plan.per_token * 1024)} per 1k "
            f"tokens; this machine's default {fmt_bytes(DEFAULT_BUDGET)} budget allows a context of {allowed} tokens"
        )
        if checked is not None:
            click.echo(f"checksums: all {checked} weight tensors match")
        elif stored_checksums(proto, model) is None:
            click.echo("checksums: none stored (converted by an older hy-edge)")
        fp8 = {
            n: float(t["rel_error"])
            for n, t in tensors.items()
            if t.get("storage") in ("e4m3", "e5m2") and is_number(t.get("rel_error"))
        }
        if fp8:
            worst = max(fp8, key=fp8.get)
            click.echo(f"FP8 relative error: mean {sum(fp8.values()) / len(fp8):.4f}, worst {fp8[worst]:.4f} ({worst})")
