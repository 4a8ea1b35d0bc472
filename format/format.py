"""The contract between the converter and the runtime: what a converted .onnx file holds.

One table of tensor names (the Hugging Face names), the graph's input/output names (the
onnxruntime-genai convention), and the metadata keys. Bump FORMAT_VERSION whenever a file written by
the previous converter would be read wrongly.

Storage of a weight `W` (a name from `layer_tensors` / `GLOBAL_TENSORS`):
- FP8:  initializer `W.qweight` (FLOAT8E4M3FN or FLOAT8E5M2, (N, K)) and `W.scale` (float32: () per
        tensor, (N,) per output channel, (N, G) per block of ceil(K/G) inputs), optionally
        `W.input_scale` (float32 (), static activation scale);
- blocks of 32 (GGUF Q8_0 / Q4_0 / Q4_1 kept exactly, hy_edge_ops.blockq): `W.qweight` INT8 (N, K), or
        UINT4 (N, K) in GGUF's byte order (block g's byte j holds weight j in its low nibble and weight
        j + 16 in its high one: onnx unpacks them as columns 2j, 2j + 1), `W.scale` FLOAT16
        (N, K/32), and for UINT4 `W.offset` FLOAT16 (N, K/32): weight = code * scale (+ offset);
- sub-byte FP (FP4 E2M1, FP6 E3M2 / E2M3, hy_edge_ops.minifloat): `W.qweight` UINT8 (N, K / 32 * 16 | 24),
        each block of 32 codes packed (minifloat's layout), `W.scale` FLOAT16 (N, K/32): weight = value(code) *
        scale; which format, the metadata says (`hy_edge.quantization` tensors[W].storage);
- GGUF's other integer blocks kept exactly (hy_edge_ops.blockq): 5-bit codes, UINT8 (N, K / 32 * 20), per
        block uint4's 16 bytes of low nibbles then a little-endian 32-bit word whose bit i is weight i's fifth
        bit: `int5` (Q5_0: weight = (code - 16) * scale, `W.scale` as int8's) and `uint5` (Q5_1: `W.scale`
        and `W.offset` as uint4's); the K-quants, whose scales come per super-block of 256 weights (FLOAT16
        (N, K/256)) and per block in bytes: `q4k` (Q4_K: UINT4 codes as uint4's) and `q5k` (Q5_K: 5-bit codes
        as uint5's) with `W.scale` d, `W.offset` dmin, `W.sub_scale` and `W.sub_offset` UINT8 (N, K/32) sc
        and m: weight = code * (d * sc) - dmin * m; `q6k` (Q6_K: 6-bit two's complement codes in FP6's layout,
        UINT8 (N, K / 32 * 24)) with `W.scale` d and `W.sub_scale` INT8 (N, K/16), one per 16 weights:
        weight = code * (d * sc). The metadata names these storages as it names the sub-byte FP ones
        (BLOCK_STORAGES);
- FP16: initializer `W` (FLOAT16), FP32: initializer `W` (FLOAT).
Linear inputs (`hy_edge.quantization` activations): "none"; "e4m3" | "e5m2" | "static": each FP8 linear's
input fake-quantized to FP8 (per token, or by `W.input_scale`); "q8": each FP4 E2M1 / FP6 E2M3 linear's
input rounded to int8 per block of 32 along K, q = round_half_even(x / s) with s = max(amax(|x|) / 127,
2**-126) in float32, and multiplied as q * s (other linears take float inputs).
Layers that share weights (`spec.shared_layers`) have no tensors of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .families import family
from .spec import ModelSpec

FORMAT_VERSION = 1

# metadata_props keys
META_FORMAT = "hy_edge.format_version"
META_SPEC = "hy_edge.spec"
META_QUANT = "hy_edge.quantization"
# JSON {"type": "tokenizers", "json": ...} | {"type": "sentencepiece", "model_b64": ...}
META_TOKENIZER = "hy_edge.tokenizer"
META_TOKENIZER_CONFIG = "hy_edge.tokenizer_config"  # JSON: chat_template, bos/eos tokens, add_bos_token, ...
META_SOURCE = "hy_edge.source"  # JSON: what the file was converted from
# JSON {"algorithm": "crc32", "tensors": {name: CRC-32 of its bytes in the data file}, "header": CRC-32 of
# the .onnx file without this entry}; files converted before it existed lack it, or its "header"
# (optional: it changes nothing about how the weights are read)
META_CHECKSUMS = "hy_edge.checksums"


def metadata(model) -> dict[str, str]:
    """metadata_props of an onnx ModelProto as a dict (read by key, never by position)."""
    return {p.key: p.value for p in model.metadata_props}


def checksums_json(checksums: dict[str, int], header: int | None = None) -> str:
    payload = {"algorithm": "crc32", "tensors": checksums}
    return json.dumps(payload if header is None else {**payload, "header": header})


# The largest scale an FP8 weight may have: the numba kernels fold 2**60 (E4M3) or 2**56 (E5M2) into each
# scale (hy_edge_ops.half.FP8_FOLD, held equal by tests/test_hardening_values.py) and a larger one
# overflows float32. A weight beyond FP8 max x this is beyond what the file format holds.
MAX_SCALE = {"e4m3": 3.4028234663852886e38 / 2.0**60, "e5m2": 3.4028234663852886e38 / 2.0**56}
FP16_MAX = 65504.0

# sub-byte FP storages (hy_edge_ops.minifloat.FORMATS) and the packed bytes of one block of 32 codes
SUBBYTE_BLOCK_BYTES = {"e2m1": 16, "e3m2": 24, "e2m3": 24}

QWEIGHT = ".qweight"
SCALE = ".scale"
OFFSET = ".offset"
SUB_SCALE = ".sub_scale"
SUB_OFFSET = ".sub_offset"
INPUT_SCALE = ".input_scale"


@dataclass(frozen=True)
class BlockStorage:
    """A block storage's tensors: `W.qweight` of ONNX type `codes` (int8: INT8 (N, K); uint4: UINT4 (N, K);
    uint8: UINT8 (N, K / 32 * code_bytes)) and `parts`: (suffix, storage, weights per element of a row)."""

    code_bytes: int  # bytes of codes per block of 32 weights
    codes: str
    parts: tuple[tuple[str, str, int], ...]


_D = ((SCALE, "fp16", 32),)
_DM = ((SCALE, "fp16", 32), (OFFSET, "fp16", 32))
_K = ((SCALE, "fp16", 256), (OFFSET, "fp16", 256), (SUB_SCALE, "uint8", 32), (SUB_OFFSET, "uint8", 32))
BLOCK_STORAGES = {
    "int8": BlockStorage(32, "int8", _D),  # Q8_0
    "uint4": BlockStorage(16, "uint4", _DM),  # Q4_0, Q4_1
    **{f: BlockStorage(n, "uint8", _D) for f, n in SUBBYTE_BLOCK_BYTES.items()},
    "int5": BlockStorage(20, "uint8", _D),  # Q5_0
    "uint5": BlockStorage(20, "uint8", _DM),  # Q5_1
    "q4k": BlockStorage(16, "uint4", _K),  # Q4_K
    "q5k": BlockStorage(20, "uint8", _K),  # Q5_K
    "q6k": BlockStorage(24, "uint8", ((SCALE, "fp16", 256), (SUB_SCALE, "int8", 16))),  # Q6_K
}

EMBED = "model.embed_tokens.weight"  # (V, C)
FINAL_NORM = "model.norm.weight"  # (C,)
LM_HEAD = "lm_head.weight"  # (V, C); absent when tied, unless the converter stores an FP8 copy

# graph inputs / outputs
INPUT_IDS = "input_ids"  # int64 (B, T)
POSITION_IDS = "position_ids"  # int64 (B, T)
LOGITS = "logits"  # float32 (B, T, V)


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"  # float32 (B, Hkv, P, D)


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"  # float32 (B, Hkv, P + T, D)


def present_value(i: int) -> str:
    return f"present.{i}.value"


def past_conv(i: int) -> str:
    return f"past_conv.{i}"  # float32 (B, C, k - 1)


def present_conv(i: int) -> str:
    return f"present_conv.{i}"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


# The per-head q/k norms' names after `self_attn.`, by family (Hugging Face's own); Hunyuan's otherwise
def qk_norm_names(spec: ModelSpec) -> tuple[str, str]:
    return family(spec.model_type).qk_norm_names


def layer_tensors(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor layer i's weights consist of (for the layer that owns them)."""
    p, C, D = layer_prefix(i), spec.hidden_size, spec.head_dim
    H, Hkv, F = spec.num_attention_heads, spec.num_key_value_heads, spec.intermediate_size
    t = {
        f"{p}.input_layernorm.weight": (C,),
        f"{p}.post_attention_layernorm.weight": (C,),
        f"{p}.mlp.gate_proj.weight": (F, C),
        f"{p}.mlp.up_proj.weight": (F, C),
        f"{p}.mlp.down_proj.weight": (C, F),
    }
    if spec.sandwich_norms:  # Gemma: post_attention_layernorm then normalises the attention's output
        t[f"{p}.pre_feedforward_layernorm.weight"] = (C,)
        t[f"{p}.post_feedforward_layernorm.weight"] = (C,)
    if spec.layer_types[i] == "attention":
        t[f"{p}.self_attn.q_proj.weight"] = (H * D, C)
        t[f"{p}.self_attn.k_proj.weight"] = (Hkv * D, C)
        t[f"{p}.self_attn.v_proj.weight"] = (Hkv * D, C)
        t[f"{p}.self_attn.o_proj.weight"] = (C, H * D)
        if spec.qkv_bias:
            t[f"{p}.self_attn.q_proj.bias"] = (H * D,)
            t[f"{p}.self_attn.k_proj.bias"] = (Hkv * D,)
            t[f"{p}.self_attn.v_proj.bias"] = (Hkv * D,)
        if spec.use_qk_norm:
            qn, kn = qk_norm_names(spec)
            t[f"{p}.self_attn.{qn}.weight"] = (D,)
            t[f"{p}.self_attn.{kn}.weight"] = (D,)
    else:
        t[f"{p}.mixer.conv.weight"] = (C, spec.conv_kernel_size)  # depthwise, per channel
        t[f"{p}.mixer.out_proj.weight"] = (C, C)  # pointwise
    return t


def model_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name → shape of every weight the model needs (shared layers listed once, under their owner)."""
    t = {EMBED: (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_hidden_layers):
        if spec.shared_layers[i] == i:
            t.update(layer_tensors(spec, i))
    t[FINAL_NORM] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        t[LM_HEAD] = (spec.vocab_size, spec.hidden_size)
    return t


def is_linear(name: str) -> bool:
    """2-D weights a matmul reads (the FP8 candidates); norms and conv kernels stay float."""
    return name.endswith("_proj.weight") or name in (EMBED, LM_HEAD)
