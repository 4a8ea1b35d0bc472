"""Every buffer a numba session writes, allocated once per session in `allocate_buffers` (llama2.c's
RunState): the shapes beside each field, and the memory plan read from the same table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hy_edge_format.spec import ModelSpec
from hy_edge_ops import attention, kvrow, rope

from .memory import MemoryPlan, lazy_zeros, runtime_overhead

# stored dtype per KV cache type: fp16 half bits rounded to nearest; fp8 rows of E4M3 codes and a scale
KV_CACHE_TYPES = kvrow.STORAGE


@dataclass
class Buffers:
    """Everything the forward pass writes. R = rows per pass = max(prefill chunk, slots), B = slots,
    S = context per slot, F = intermediate size, La / Lc = attention / dwconv layers, k = conv kernel."""

    rows: np.ndarray  # (R * C,) f32: the embedding rows of a forward as stored (fp16 bits: the first half)
    x: np.ndarray  # (R, C) residual stream
    h: np.ndarray  # (R, C) normed input of a block
    y: np.ndarray  # (R, C) block output (o_proj / out_proj / down_proj)
    mix: np.ndarray  # (R, C) dwconv output before out_proj
    q: np.ndarray  # (R, H*D) query (RoPE applied in place), then the attention output
    k: np.ndarray  # (R, Hkv*D)
    v: np.ndarray  # (R, Hkv*D)
    gate: np.ndarray  # (R, F)
    up: np.ndarray  # (R, F)
    act: np.ndarray  # (R, F) act(gate) * up
    xq: np.ndarray  # (R * max K,) fake-quantized linear input, viewed as (T, K) (activation quant only)
    ramp: np.ndarray  # (R,) int64 0, 1, 2, ...
    positions: np.ndarray  # (R,) int64 absolute position of each row
    row_slots: np.ndarray  # (R,) int64 sequence slot of each row
    logits: np.ndarray  # (B, V) last token's logits per slot
    k_cache: np.ndarray  # (La, B, Hkv, S, D) float32 or uint16 half bits; (.., D + 4) int8 FP8 rows
    v_cache: np.ndarray  # (La, B, Hkv, S, D) as k_cache
    scores: np.ndarray  # (threads, QB*H/Hkv, S) attention scores of one work item per thread
    values_t: np.ndarray  # (threads, D, S + 16) one kv head's values, transposed, for a prefill chunk
    conv_state: np.ndarray  # (Lc, B, C, k-1) last k-1 dwconv inputs, oldest first
    conv_hist: np.ndarray  # (Lc, B, S, C) every dwconv input so far: truncate() rebuilds conv_state from it
    cos: np.ndarray  # (S, D/2) RoPE tables
    sin: np.ndarray  # (S, D/2)
    cos_local: np.ndarray  # (S, D/2) the sliding layers' (spec.rope_local_theta), else (0, D/2)
    sin_local: np.ndarray


def buffer_shapes(
    spec: ModelSpec, chunk: int, context: int, act_quant: bool, slots: int = 1, kv_cache: str = "fp32"
) -> dict[str, tuple]:
    """Name → (shape, dtype) of every Buffers field: sizes the memory plan before anything exists."""
    C, H, Hkv, D = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    F, V, S, R, B = spec.intermediate_size, spec.vocab_size, context, max(chunk, slots), slots
    La, Lc, k = len(spec.attention_layers), len(spec.conv_layers), spec.conv_kernel_size
    f32, kv, row = np.float32, KV_CACHE_TYPES[kv_cache], kvrow.row_length(kv_cache, spec.head_dim)
    kmax = max(C, F, H * D)
    return dict(
        rows=((R * C,), f32),
        x=((R, C), f32),
        h=((R, C), f32),
        y=((R, C), f32),
        mix=((R, C) if Lc else (0, C), f32),
        q=((R, H * D), f32),
        k=((R, Hkv * D), f32),
        v=((R, Hkv * D), f32),
        gate=((R, F), f32),
        up=((R, F), f32),
        act=((R, F), f32),
        xq=((R * kmax if act_quant else 0,), f32),
        ramp=((R,), np.int64),
        positions=((R,), np.int64),
        row_slots=((R,), np.int64),
        logits=((B, V), f32),
        k_cache=((La, B, Hkv, S, row), kv),
        v_cache=((La, B, Hkv, S, row), kv),
        scores=(attention.scratch_shape(H, Hkv, S), f32),
        values_t=(attention.values_scratch_shape(D, S), f32),
        conv_state=((Lc, B, C, k - 1), f32),
        conv_hist=((Lc, B, S, C), f32),
        cos=((S, D // 2), f32),
        sin=((S, D // 2), f32),
        cos_local=((S if spec.sliding_layers else 0, D // 2), f32),
        sin_local=((S if spec.sliding_layers else 0, D // 2), f32),
    )


def memory_plan(
    spec: ModelSpec, weights_bytes: int, chunk: int, act_quant: bool, slots: int = 1, kv_cache: str = "fp32"
) -> MemoryPlan:
    """Bytes of a session: the context-sized buffers grow per token, the rest is fixed."""
    one = buffer_shapes(spec, chunk, 1, act_quant, slots, kv_cache)
    two = buffer_shapes(spec, chunk, 2, act_quant, slots, kv_cache)
    nbytes = {n: int(np.prod(s)) * np.dtype(d).itemsize for n, (s, d) in one.items()}
    per_token = sum(int(np.prod(two[n][0])) * np.dtype(two[n][1]).itemsize - nbytes[n] for n in one)
    fixed = sum(nbytes.values()) - per_token
    return MemoryPlan(weights_bytes, fixed, per_token, runtime_overhead("numba", weights_bytes))


def allocate_buffers(
    spec: ModelSpec, chunk: int, context: int, act_quant: bool, slots: int = 1, kv_cache: str = "fp32"
) -> Buffers:
    """The one place a session allocates. Caches are zero-filled and become resident only where a
    position is written (`memory.lazy_zeros`); activations are left uninitialised."""
    out = {}
    for name, (shape, dtype) in buffer_shapes(spec, chunk, context, act_quant, slots, kv_cache).items():
        cached = name in ("k_cache", "v_cache", "conv_state", "conv_hist")
        out[name] = lazy_zeros(shape, dtype) if cached else np.empty(shape, dtype)
    out["ramp"][:] = np.arange(out["ramp"].shape[0])
    inv_freq = rope.rope_inv_freq(
        spec.head_dim, spec.rope_theta, spec.rope_llama3, spec.rope_freq_factors, spec.rope_linear
    )
    out["cos"][...], out["sin"][...] = rope.rope_tables(inv_freq, context)
    if spec.sliding_layers:
        local = rope.rope_inv_freq(spec.head_dim, spec.rope_local_theta)
        out["cos_local"][...], out["sin_local"][...] = rope.rope_tables(local, context)
    return Buffers(**out)
