"""checkpoint → spec → quantize → graph → one .onnx file (+ its external data)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from hy_edge_format import format as F
from hy_edge_format.errors import CheckpointError, HyEdgeError, SpecError
from hy_edge_format.heap import trim_heap
from hy_edge_format.spec import ModelSpec, spec_from_hf_config
from hy_edge_ops import blockq
from hy_edge_ops.fp8 import has_nan_codes
from onnx import TensorProto, helper

from .allocate import allocate, with_formats
from .budget import check_budget
from .calibrate import CALIBRATION_TEXT, Calibration, calibration_ids
from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .gguf_reader import GGUF_KEYS
from .gptq import Hessian
from .graph import FP8_TYPES, IR_VERSION, OPSET, GraphBuilder, StoredWeight, io_value_infos
from .quantize import (
    Quantized,
    QuantPolicy,
    carry_blocks,
    carry_fp8,
    dequantize_carried,
    keeps_blocks,
    quantize_weight,
    to_fp16,
)
from .writer import ExternalData, commit

Progress = Callable[[str, int, int], None]  # (tensor name, index, total)


@dataclass
class ConversionReport:
    out: Path
    spec: ModelSpec
    source_bytes: int
    onnx_bytes: int = 0
    data_bytes: int = 0
    seconds: float = 0.0
    tensors: dict[str, dict] = field(default_factory=dict)
    calibration: dict | None = None  # the text and token counts the calibration pass ran, if it ran
    allocation: dict | None = None  # --bits: the measured sensitivities behind each linear's format
    notes: list[str] = field(default_factory=list)  # what the converter decided that was not asked for

    @property
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for t in self.tensors.values():
            c[t["storage"]] = c.get(t["storage"], 0) + 1
        return dict(sorted(c.items()))

    @property
    def worst(self) -> tuple[str, float]:
        fp8 = {n: t["rel_error"] for n, t in self.tensors.items() if t["storage"] in FP8_TYPES}
        if not fp8:
            return ("", 0.0)
        name = max(fp8, key=fp8.get)
        return name, fp8[name]


def _is_fp8_checkpoint(ckpt: Checkpoint) -> bool:
    q = ckpt.config.get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors"


def _source(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> TensorRef:
    """The checkpoint tensor weight `name` is made from (an FP8 lm_head copy: the tied embedding)."""
    if name == F.LM_HEAD and F.LM_HEAD not in ckpt.tensors:
        name = F.EMBED
    ref = ckpt.tensors.get(name)
    if ref is None:
        raise CheckpointError(f"{ckpt.path}: tensor '{name}' is missing")
    if tuple(ref.shape) != tuple(shape):
        raise CheckpointError(f"{ckpt.path}: tensor '{name}' has shape {tuple(ref.shape)}, expected {shape}")
    return ref


def _spec(ckpt: Checkpoint) -> ModelSpec:
    """The checkpoint's spec; for a GGUF the error names its file and the metadata key, not config.json
    (its config is read from the metadata)."""
    try:
        return spec_from_hf_config(ckpt.config)
    except SpecError as e:
        message = str(e).removeprefix("config.json: ")
        if ckpt.kind != "gguf":
            raise SpecError(f"{Path(ckpt.path) / 'config.json'}: {message}") from None
        for hf, key in GGUF_KEYS.items():
            message = message.replace(f"'{hf}'", f"'{ckpt.config.get('model_type')}.{key}'")
        raise SpecError(f"{ckpt.path}: GGUF metadata: {message}") from None


def _finite(ckpt: Checkpoint, name: str, w: np.ndarray, what: str = "weight") -> None:
    """NaN or infinity in a source tensor is a corrupt checkpoint: FP8 encoding would saturate it to
    the format's largest value, silently. max/min propagate NaN and need no temporary array."""
    if w.size and not (np.isfinite(w.max()) and np.isfinite(w.min())):
        i = np.unravel_index(int(np.flatnonzero(~np.isfinite(w))[0]), w.shape)
        value = w[i]
        raise CheckpointError(
            f"{ckpt.path}: {what} '{name}' holds {value} at {list(map(int, i))}: the checkpoint is corrupt"
        )


def _in_range(ckpt: Checkpoint, name: str, q: Quantized) -> None:
    """An FP8 weight whose scale the runtime's kernels cannot fold (format.MAX_SCALE) is refused, not
    stored to fail at run time."""
    if q.storage in FP8_TYPES:
        limit = F.MAX_SCALE[q.storage]
        s = np.asarray(q.scale, np.float32)
        if s.size and not (np.isfinite(s.max()) and np.isfinite(s.min()) and s.min() >= 0 and s.max() <= limit):
            bad = s.reshape(-1)[~((s >= 0) & (s <= limit))].reshape(-1)[0]
            raise CheckpointError(
                f"{ckpt.path}: weight '{name}' needs an FP8 scale of {bad:.4g}, beyond what the format holds "
                f"(0..{limit:.3g}): its values are too large or the checkpoint's scales are corrupt"
            )
        if q.input_scale is not None and not (np.isfinite(q.input_scale) and q.input_scale > 0):
            raise CheckpointError(f"{ckpt.path}: input_scale of '{name}' is {float(q.input_scale)}: not a scale")


def _produce(
    ckpt: Checkpoint, name: str, shape: tuple[int, ...], policy: QuantPolicy, calib: Calibration | None = None
) -> Quantized:
    q = _quantized(ckpt, name, shape, policy, calib)
    _in_range(ckpt, name, q)
    return q


def _quantized(
    ckpt: Checkpoint, name: str, shape: tuple[int, ...], policy: QuantPolicy, calib: Calibration | None = None
) -> Quantized:
    if calib is not None and F.is_linear(name) and name != F.EMBED and len(shape) == 2:
        return calib.take(name)  # made in the calibration pass, in layer order (calls back below for each)
    ref = _source(ckpt, name, shape)
    src_name = ref.name
    if ref.dtype == "f8_e4m3":  # an FP8 release: carry the bytes, or expand them for --format none
        base = src_name[: -len(".weight")]
        scale_ref = ckpt.tensors.get(base + ".weight_scale")
        if scale_ref is None:
            raise CheckpointError(f"{ckpt.path}: FP8 tensor '{src_name}' has no weight_scale")
        inp = ckpt.tensors.get(base + ".input_scale")
        codes, scale = ref.load(), scale_ref.load()
        _finite(ckpt, scale_ref.name, scale, "scale")
        if policy.format == "none":
            w = dequantize_carried(codes, scale)
            _finite(ckpt, src_name, w)  # NaN codes decode to NaN
            return Quantized("fp32", w)
        q = carry_fp8(codes, scale, None if inp is None else inp.load())
        if policy.format not in ("source", "e4m3", "auto") or policy.granularity != "channel":
            q = dataclasses.replace(q, note="FP8 checkpoint: its bytes and scales are carried over as they are")
        return q
    if keeps_blocks(policy, ref.block_type) and F.is_linear(name):
        q = carry_blocks(ref.block_type, ref.load_blocks(), tuple(shape))
        for what, a in (("scale", q.scale), ("offset", q.offset)):
            if a is not None:
                _finite(ckpt, src_name, a, f"block {what} of")
        return q
    w = ref.load().astype(np.float32, copy=False)
    _finite(ckpt, src_name, w)
    if not F.is_linear(name) or len(shape) != 2:
        return Quantized("fp32", np.ascontiguousarray(w))
    if policy.format != "none" and (name == F.EMBED or policy.stays_float(name)):  # stored as FP16
        amax = max(float(w.max()), -float(w.min())) if w.size else 0.0
        if amax > F.FP16_MAX:  # it would be stored as inf
            raise CheckpointError(
                f"{ckpt.path}: weight '{name}' holds {amax:.4g}, beyond what FP16 holds ({F.FP16_MAX:g}); "
                "convert with --format none, or fix the checkpoint"
            )
    if name == F.EMBED:  # gathered row by row: float16 when quantizing, fp32 for the reference
        return Quantized("fp32", np.ascontiguousarray(w)) if policy.format == "none" else to_fp16(w)
    return quantize_weight(name, w, policy)


def _float_weight(ckpt: Checkpoint, names: dict[str, tuple[int, ...]], name: str) -> np.ndarray:
    """A weight as float32, for the calibration forward (an FP8 release's: its bytes times its scale)."""
    ref = _source(ckpt, name, names[name])
    if ref.dtype == "f8_e4m3":
        return dequantize_carried(ref.load(), ckpt.tensors[ref.name[: -len(".weight")] + ".weight_scale"].load())
    w = ref.load().astype(np.float32, copy=False)
    _finite(ckpt, ref.name, w)
    return w


def _rounded_from_floats(ckpt: Checkpoint, policy: QuantPolicy, name: str, shape: tuple[int, ...]) -> bool:
    """Whether linear `name` is rounded onto the FP8 grid from float values here (not an FP8 release's
    bytes or GGUF blocks kept as they are, nor a weight kept in FP16): what calibration can improve."""
    ref = _source(ckpt, name, shape)
    return ref.dtype != "f8_e4m3" and not keeps_blocks(policy, ref.block_type) and not policy.stays_float(name)


def _from_floats(ckpt: Checkpoint, names: dict, policy: QuantPolicy) -> bool:
    """Whether some linear is rounded onto the FP8 grid from float values (what calibration can improve)."""
    linears = [n for n, shape in names.items() if F.is_linear(n) and n != F.EMBED and len(shape) == 2]
    return policy.format != "none" and any(_rounded_from_floats(ckpt, policy, n, names[n]) for n in linears)


def resolve_policy(ckpt: Checkpoint, names: dict, policy: QuantPolicy) -> QuantPolicy:
    """`auto` rounding and scales decided for this checkpoint: calibrated where some linear is rounded from
    floats and the checkpoint's tokenizer can run the calibration text (without one: round-to-nearest, with
    a note in the report)."""
    floats = _from_floats(ckpt, names, policy)
    return policy.resolved(calibratable=floats and ckpt.tokenizer is not None)


def _calibration(ckpt: Checkpoint, spec: ModelSpec, names: dict, policy: QuantPolicy) -> Calibration | None:
    """The calibration pass, when the policy's rounding or scales need the inputs of each linear and some
    linear is rounded from floats."""
    if not policy.calibrated or not _from_floats(ckpt, names, policy):
        return None
    ids = calibration_ids(_tokenizer_metadata(ckpt), CALIBRATION_TEXT.read_text(encoding="utf-8"))

    def quantize(name: str, w: np.ndarray, H: Hessian | None) -> Quantized:
        if not _rounded_from_floats(ckpt, policy, name, names[name]):
            return _quantized(ckpt, name, names[name], policy)  # carried or FP16, as without calibration
        q = quantize_weight(name, w, policy, H)
        _in_range(ckpt, name, q)  # refused before the calibration forward computes with it
        if H is None:  # the inputs that reach it overflowed float32 on the calibration text
            q = dataclasses.replace(q, note="its calibration inputs are not finite: rounded without them")
        return q

    return Calibration(spec, ids, lambda name: _float_weight(ckpt, names, name), quantize)


def _allocate(ckpt: Checkpoint, spec: ModelSpec, names: dict, policy: QuantPolicy) -> tuple[QuantPolicy, dict]:
    decide = {
        n: s
        for n, s in names.items()
        if F.is_linear(n) and n != F.EMBED and len(s) == 2 and _rounded_from_floats(ckpt, policy, n, s)
    }
    ids = None
    if ckpt.tokenizer is not None:
        ids = calibration_ids(_tokenizer_metadata(ckpt), CALIBRATION_TEXT.read_text(encoding="utf-8"))
    chosen, report = allocate(spec, ids, lambda name: _float_weight(ckpt, names, name), decide, policy.bits)
    return with_formats(policy, chosen), report


def _tokenizer_metadata(ckpt: Checkpoint) -> dict[str, str]:
    tok = ckpt.tokenizer
    if tok is None:
        return {}
    if tok.kind == "tokenizers":
        payload = {"type": "tokenizers", "json": tok.data.decode("utf-8")}
    else:
        payload = {"type": "sentencepiece", "model_b64": base64.b64encode(tok.data).decode("ascii")}
    return {F.META_TOKENIZER: json.dumps(payload), F.META_TOKENIZER_CONFIG: json.dumps(tok.config)}


def head_copy(policy: QuantPolicy, spec, ckpt: Checkpoint | None = None) -> bool:
    """Whether a tied lm_head gets its own FP8 copy: by default yes (decode reads the head every token,
    and in FP8 it is half the bytes of the FP16 embedding), except unquantized, with static activation
    scales (a checkpoint has no input_scale for a head it does not store), or when the embedding is
    kept in its source's blocks (the head reads them as they are: exact, and as small)."""
    ref = None if ckpt is None else ckpt.tensors.get(F.EMBED)
    kept = ref is not None and keeps_blocks(policy, ref.block_type)
    return (
        policy.lm_head_fp8
        and spec.tie_word_embeddings
        and policy.format != "none"
        and policy.activations != "static"
        and not kept
    )


def convert(
    src: Path | str,
    out: Path | str,
    policy: QuantPolicy | None = None,
    progress: Progress | None = None,
    source_extra: dict | None = None,
    max_memory: int | None = None,
) -> ConversionReport:
    """Convert a Hugging Face checkpoint directory or a GGUF file to `out` (.onnx + .onnx.data).
    `source_extra` is recorded in the file's source metadata (the cache keys its files by it);
    `max_memory` (bytes) is a budget the conversion must hold, checked before anything is read
    (BudgetError)."""
    policy = policy or QuantPolicy()
    out = Path(out)
    if not out.parent.is_dir():
        raise HyEdgeError(f"output directory {out.parent} does not exist")
    if out.suffix != ".onnx":
        raise HyEdgeError(f"output {out} should end in .onnx")
    start = time.perf_counter()
    with open_checkpoint(src) as ckpt:
        spec = _spec(ckpt)
        names = F.model_tensors(spec)
        if head_copy(policy, spec, ckpt):
            names[F.LM_HEAD] = (spec.vocab_size, spec.hidden_size)  # an FP8 copy of the tied embedding
        for name, shape in names.items():  # fail before writing anything
            _source(ckpt, name, shape)
        asked, policy = policy, resolve_policy(ckpt, names, policy)
        allocation = None
        if policy.bits is not None:  # each linear's format, by measured sensitivity under the budget
            policy, allocation = _allocate(ckpt, spec, names, policy)
        fallback = asked.rounding == "auto" and not policy.calibrated and _from_floats(ckpt, names, policy)
        if max_memory is not None:
            check_budget(ckpt, names, policy, max_memory, spec)
        report = ConversionReport(out, spec, _source_bytes(Path(ckpt.path)))
        if fallback:
            report.notes.append(
                "the checkpoint has no tokenizer to run the calibration text: FP8 weights rounded to nearest"
            )
        report.allocation = allocation
        calib = _calibration(ckpt, spec, names, policy)
        if calib is not None:
            S, T = calib.ids.shape
            report.calibration = {"text": CALIBRATION_TEXT.name, "sequences": S, "tokens": T}
        data = ExternalData(out)
        try:
            inits, stored = [], {}
            for i, (name, shape) in enumerate(names.items()):
                if progress:
                    progress(name, i, len(names))
                q = _produce(ckpt, name, shape, policy, calib)
                if policy.activations == "static" and q.storage in FP8_TYPES and q.input_scale is None:
                    raise HyEdgeError(
                        f"--activations static needs an input_scale for '{name}' (only FP8-static checkpoints have one)"
                    )
                if q.storage in FP8_TYPES and has_nan_codes(q.data, q.storage):
                    # the runtime's kernels do not decode NaN: a weight with NaN codes is refused here
                    raise CheckpointError(
                        f"{ckpt.path}: weight '{name}' holds FP8 NaN codes: the checkpoint is corrupt"
                    )
                if q.storage in F.BLOCK_STORAGES:  # codes, then the scales the storage has (format.py)
                    inits.extend(_block_initializers(data, name, q))
                elif q.storage in FP8_TYPES:
                    inits.append(data.add(name + F.QWEIGHT, q.data, FP8_TYPES[q.storage]))
                    inits.append(data.add(name + F.SCALE, q.scale))
                    if q.input_scale is not None:
                        inits.append(data.add(name + F.INPUT_SCALE, q.input_scale))
                else:
                    inits.append(data.add(name, q.data))
                stored[name] = StoredWeight(q.storage, tuple(shape), () if q.scale is None else q.scale.shape)
                report.tensors[name] = q.report()
                del q
                trim_heap()  # a tensor's temporaries, freed, go back: the next one's peak starts low
            model = _model(spec, stored, inits, policy, report, ckpt, source_extra or {})
            # the header's checksum: the file's bytes but the entry that holds it (integrity.header_crc)
            header = zlib.crc32(model.SerializeToString())
            sums = F.checksums_json(data.checksums, header)
            helper.set_model_props(model, {**F.metadata(model), F.META_CHECKSUMS: sums})
            commit(model, out, data)
        except BaseException:
            data.discard()
            raise
    report.onnx_bytes = out.stat().st_size
    report.data_bytes = data.final.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def _block_initializers(data, name: str, q: Quantized) -> list:
    """A block weight's initializers: `W.qweight` (INT8 (N, K), UINT4 (N, K) from (N, K/32, 16) bytes, or
    the packed UINT8 bytes, whose storage the metadata names), then its scales (format.BLOCK_STORAGES)."""
    block = F.BLOCK_STORAGES[q.storage]
    if block.codes == "int8":
        out = [data.add(name + F.QWEIGHT, q.data, TensorProto.INT8)]
    elif block.codes == "uint4":
        dims = (q.data.shape[0], q.data[0].size * 2)
        out = [data.add(name + F.QWEIGHT, q.data, TensorProto.UINT4, dims)]
    else:
        out = [data.add(name + F.QWEIGHT, q.data, TensorProto.UINT8)]
    parts = {F.SCALE: q.scale, F.OFFSET: q.offset, **dict(zip((F.SUB_SCALE, F.SUB_OFFSET), q.subs, strict=False))}
    return out + [data.add(name + suffix, parts[suffix]) for suffix, _, _ in block.parts]


def _source_bytes(path: Path) -> int:
    """Size of the weight files converted from (the GGUF, or the directory's safetensors)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _model(
    spec: ModelSpec,
    stored: dict[str, StoredWeight],
    inits: list,
    policy: QuantPolicy,
    report: ConversionReport,
    ckpt: Checkpoint,
    source_extra: dict,
) -> onnx.ModelProto:
    if policy.activations == "q8" and not any(w.storage in blockq.INTEGER_INPUTS for w in stored.values()):
        raise HyEdgeError(
            "--activations q8 rounds the inputs of FP4 / FP6 E2M3 linears, and this conversion has none "
            "(a linear whose K is not whole blocks of 32 stays FP16)"
        )
    builder = GraphBuilder(spec, stored, policy.activations)
    builder.make_model()
    inputs, outputs = io_value_infos(spec)
    graph = helper.make_graph(builder.nodes, "hy-edge", inputs, outputs, initializer=inits + builder.consts)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hy-edge", ir_version=IR_VERSION
    )
    quant = {
        "format": policy.format,
        **({"bits": policy.bits} if policy.bits is not None else {}),
        "granularity": policy.granularity,
        "activations": policy.activations,
        "keep_fp16": list(policy.keep_fp16),
        "rounding": policy.rounding,
        "scales": policy.scales,
        "tensors": report.tensors,
    }
    if report.calibration:  # which text and how much of it weighed the rounding
        quant["calibration"] = report.calibration
    if report.allocation:  # --bits: what each kind of linear cost in each format
        quant["allocation"] = report.allocation
    meta = {
        F.META_FORMAT: str(F.FORMAT_VERSION),
        F.META_SPEC: spec.to_json(),
        F.META_QUANT: json.dumps(quant),
        F.META_SOURCE: json.dumps(
            {
                "path": str(ckpt.path),
                "kind": ckpt.kind,
                "fp8_checkpoint": _is_fp8_checkpoint(ckpt),
                "source_bytes": report.source_bytes,
                **source_extra,
            }
        ),
        **_tokenizer_metadata(ckpt),
    }
    helper.set_model_props(model, meta)
    return model
