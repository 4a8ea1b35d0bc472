"""The memory a conversion holds at its peak, planned before it starts: a first run converts its model
under the same `--max-memory` as the run itself, and a budget it cannot hold is refused before anything
is read or written.

A conversion holds one tensor at a time: its bytes from the checkpoint (mapped pages, dropped after the
read), its float32 copy (all but an FP8 checkpoint's codes, which are carried as they are) and what is
stored (FP8 codes, FP16 or float32), on top of what it holds throughout (the interpreter, numpy, numba,
onnx, gguf, the tokenizer). Measured on SmolLM2-135M (Q4_1 GGUF, embedding 49152 x 576): 156 MB before
the first tensor, 367 MB at the peak, while the embedding is converted (float32 113 MB, FP16 57 MB,
Q4_1 bytes 18 MB: 188 MB planned, 211 MB held).

A calibrated conversion (gptq, searched scales) also runs the calibration text through the model: its hidden
states stay while each tensor is quantized, GPTQ works on a second float32 copy of a linear (its columns in
their order), and the pass holds one layer's activations, attention scores and the second moment of the
widest input with its inverse factor (float64). Measured on the Hunyuan-0.5B shapes (bench/conversion.py):
peak 885 MB rounded to nearest (planned 1,255 MB), 1,265 MB calibrated (planned 1,681 MB).
"""

from __future__ import annotations

from hy_edge_format import format as F
from hy_edge_format.errors import BudgetError
from hy_edge_format.sizes import MB, fmt_bytes
from hy_edge_format.spec import ModelSpec

from .calibrate import SEQ_LEN, SEQUENCES
from .checkpoint import Checkpoint
from .quantize import QuantPolicy, keeps_blocks

CONVERT_OVERHEAD = 170 * MB  # held throughout (measured 156 MB with SmolLM2's 49k-token vocabulary)
MARGIN = 1.15  # allocator slack and the quantizer's row-chunk temporaries, over the tensor's own arrays


def tensor_bytes(ckpt: Checkpoint, name: str, shape: tuple[int, ...], policy: QuantPolicy) -> int:
    """What converting weight `name` holds at once (pipeline._produce: read, widen, quantize, store)."""
    ref = ckpt.tensors.get(name) or ckpt.tensors.get(F.EMBED)  # an FP8 head copy reads the embedding
    n = 1
    for d in shape:
        n *= d
    source = ref.nbytes if ref is not None and ref.nbytes else 4 * n
    if ref is not None and keeps_blocks(policy, ref.block_type):
        return 3 * source  # the rows read, then split into codes and scales
    if ref is not None and ref.dtype == "f8_e4m3" and policy.format != "none":
        return source + n  # codes carried over: no float32 copy
    linear = F.is_linear(name) and len(shape) == 2
    if not linear or policy.format == "none":
        stored = 4 * n
    elif name == F.EMBED or policy.stays_float(name):
        stored = 2 * n
    else:
        stored = n * (2 if policy.format == "auto" else 1)  # auto encodes both formats, keeps one
        if policy.calibrated:
            stored += 4 * n  # GPTQ's working copy, its columns permuted
    return source + 4 * n + stored


def calibration_bytes(spec: ModelSpec) -> tuple[int, int]:
    """(what the calibration pass keeps while every tensor is quantized: the calibration tokens' hidden
    states; what it holds at most while it runs a layer: activations, scores and one second moment)."""
    tokens, C, F_ = SEQUENCES * SEQ_LEN, spec.hidden_size, spec.intermediate_size
    kept = 4 * tokens * C
    layer = 4 * tokens * (3 * C + 4 * F_) + 2 * 4 * SEQUENCES * spec.num_attention_heads * SEQ_LEN * SEQ_LEN
    K = max(C, F_, spec.num_attention_heads * spec.head_dim)
    return kept, layer + 3 * 8 * K * K


def conversion_peak(
    ckpt: Checkpoint, names: dict[str, tuple[int, ...]], policy: QuantPolicy, spec: ModelSpec | None = None
) -> tuple[int, str]:
    """(planned peak RSS, the tensor at which it peaks, or "the calibration pass"). `spec`: the model's,
    needed for a calibrated policy (resolved: pipeline.resolve_policy)."""
    largest = max(names, key=lambda name: tensor_bytes(ckpt, name, names[name], policy))
    held = tensor_bytes(ckpt, largest, names[largest], policy)
    if spec is not None and policy.calibrated:
        kept, layer = calibration_bytes(spec)
        if layer > held:
            return CONVERT_OVERHEAD + int(MARGIN * (kept + layer)), "the calibration pass"
        held += kept
    return CONVERT_OVERHEAD + int(MARGIN * held), largest


def check_budget(
    ckpt: Checkpoint, names: dict[str, tuple[int, ...]], policy: QuantPolicy, budget: int, spec: ModelSpec | None = None
) -> None:
    """BudgetError (one line, with the numbers) when the conversion would pass `budget`."""
    peak, largest = conversion_peak(ckpt, names, policy, spec)
    where = largest if largest == "the calibration pass" else f"tensor '{largest}'"
    if peak > budget:
        raise BudgetError(
            f"memory budget {fmt_bytes(budget)} is too small to convert {ckpt.path}: the conversion needs "
            f"~{fmt_bytes(peak)} (runtime ~{fmt_bytes(CONVERT_OVERHEAD)}, then {where}); convert it "
            f"where more memory is free (hy-edge convert) and run the .onnx"
        )
