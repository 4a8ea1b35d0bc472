"""Backend "numba": the forward pass on memory-mapped weights with hy_edge_ops kernels.

Every buffer the forward pass touches is allocated once per session, in `allocate_buffers` (the one
documented place, shapes beside the fields, as llama2.c's RunState). A decode step allocates no
arrays. FP8 weights stay FP8 bytes; the kernels decode them through a 256-entry table with the
scales fused in.

Semantics follow transformers' HunYuanDenseV1 / Llama (and the converter's graph, convert/graph.py):
pre-norm residual blocks; q, k, v → RoPE (NeoX) → per-head RMSNorm of q and k (Hunyuan, after RoPE)
→ causal GQA; or, in dwconv layers, a depthwise causal conv then a pointwise projection; gated MLP
with SiLU or ReLU6; final norm; logits = h @ lm_head^T (the embedding when tied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hy_edge_ops import activation, attention, conv, fp8, linear, norm, rope

from .errors import BudgetError
from .memory import DEFAULT_BUDGET, MemoryPlan, plan_context
from .spec import ModelSpec
from .weights import Linear, Weights

FP8_FORMATS = ("e4m3", "e5m2")
DEFAULT_PREFILL_CHUNK = 128


@dataclass
class Buffers:
    """Everything the forward pass writes. Tc = prefill chunk, S = context, F = intermediate size,
    La / Lc = number of attention / dwconv layers, k = conv kernel size."""

    x: np.ndarray  # (Tc, C) residual stream
    h: np.ndarray  # (Tc, C) normed input of a block
    y: np.ndarray  # (Tc, C) block output (o_proj / out_proj / down_proj)
    mix: np.ndarray  # (Tc, C) dwconv output before out_proj
    q: np.ndarray  # (Tc, H*D) query (RoPE applied in place)
    k: np.ndarray  # (Tc, Hkv*D)
    v: np.ndarray  # (Tc, Hkv*D)
    attn: np.ndarray  # (Tc, H*D) attention output
    scores: np.ndarray  # (H, S) attention scores of one query row per head
    gate: np.ndarray  # (Tc, F)
    up: np.ndarray  # (Tc, F)
    act: np.ndarray  # (Tc, F) act(gate) * up
    xq: np.ndarray  # (Tc * max K,) fake-quantized linear input, viewed as (T, K) (activation quant only)
    ramp: np.ndarray  # (Tc,) int64 0, 1, 2, ...
    positions: np.ndarray  # (Tc,) int64 absolute positions of the chunk
    logits: np.ndarray  # (V,) last token's logits
    k_cache: np.ndarray  # (La, Hkv, S, D)
    v_cache: np.ndarray  # (La, Hkv, S, D)
    conv_state: np.ndarray  # (Lc, C, k-1) last k-1 dwconv inputs, oldest first
    conv_hist: np.ndarray  # (Lc, S, C) every dwconv input so far: truncate() rebuilds conv_state from it
    cos: np.ndarray  # (S, D/2) RoPE tables
    sin: np.ndarray  # (S, D/2)


def buffer_shapes(spec: ModelSpec, chunk: int, context: int, act_quant: bool) -> dict[str, tuple]:
    """Name → (shape, dtype) of every Buffers field: sizes the memory plan before anything exists."""
    C, H, Hkv, D = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    F, V, S, T = spec.intermediate_size, spec.vocab_size, context, chunk
    La, Lc, k = len(spec.attention_layers), len(spec.conv_layers), spec.conv_kernel_size
    f32 = np.float32
    kmax = max(C, F, H * D)
    return dict(
        x=((T, C), f32),
        h=((T, C), f32),
        y=((T, C), f32),
        mix=((T, C) if Lc else (0, C), f32),
        q=((T, H * D), f32),
        k=((T, Hkv * D), f32),
        v=((T, Hkv * D), f32),
        attn=((T, H * D), f32),
        scores=((H, S), f32),
        gate=((T, F), f32),
        up=((T, F), f32),
        act=((T, F), f32),
        xq=((T * kmax if act_quant else 0,), f32),
        ramp=((T,), np.int64),
        positions=((T,), np.int64),
        logits=((V,), f32),
        k_cache=((La, Hkv, S, D), f32),
        v_cache=((La, Hkv, S, D), f32),
        conv_state=((Lc, C, k - 1), f32),
        conv_hist=((Lc, S, C), f32),
        cos=((S, D // 2), f32),
        sin=((S, D // 2), f32),
    )


def memory_plan(spec: ModelSpec, weights_bytes: int, chunk: int, act_quant: bool) -> MemoryPlan:
    """Bytes of a session: the context-sized buffers grow per token, the rest is fixed."""
    one = buffer_shapes(spec, chunk, 1, act_quant)
    two = buffer_shapes(spec, chunk, 2, act_quant)
    nbytes = {n: int(np.prod(s)) * np.dtype(d).itemsize for n, (s, d) in one.items()}
    per_token = sum(int(np.prod(two[n][0])) * np.dtype(two[n][1]).itemsize - nbytes[n] for n in one)
    fixed = sum(nbytes.values()) - per_token
    return MemoryPlan(weights=weights_bytes, fixed=fixed, per_token=per_token)


def allocate_buffers(spec: ModelSpec, chunk: int, context: int, act_quant: bool) -> Buffers:
    """The one place a session allocates. Caches are zero-filled (calloc: pages become resident only
    when a position is written); activations are left uninitialised."""
    out = {}
    for name, (shape, dtype) in buffer_shapes(spec, chunk, context, act_quant).items():
        cached = name in ("k_cache", "v_cache", "conv_state", "conv_hist")
        out[name] = np.zeros(shape, dtype) if cached else np.empty(shape, dtype)
    out["ramp"][:] = np.arange(chunk)
    inv_freq = rope.rope_inv_freq(spec.head_dim, spec.rope_theta)
    out["cos"][...], out["sin"][...] = rope.rope_tables(inv_freq, context)
    return Buffers(**out)


class NumbaSession:
    """One conversation's state on the numba backend: caches, positions, buffers.

    Interface shared with OrtSession: `spec`, `max_context`, `n_cached`, `forward(ids, all_logits)`,
    `truncate(n)`, `reset()`.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: Weights,
        *,
        activations: str = "none",
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_memory: int = DEFAULT_BUDGET,
        threads: int | None = None,
    ):
        from .threads import set_threads

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk should be >= 1, got {prefill_chunk}")
        self.spec = spec
        self.weights = weights
        self.threads = set_threads(threads)
        self.activations = activations  # none | e4m3 | e5m2 | static (see _fake_quant)
        act_quant = activations != "none"
        self.prefill_chunk = prefill_chunk
        self.plan = memory_plan(spec, weights.nbytes, prefill_chunk, act_quant)
        self.max_context = plan_context(self.plan, max_memory, max_context, spec.max_position_embeddings)
        self.buf = allocate_buffers(spec, prefill_chunk, self.max_context, act_quant)
        self.n_cached = 0
        # per-layer index into k_cache / conv_state
        self._slot = {i: n for n, i in enumerate(spec.attention_layers)}
        self._slot.update({i: n for n, i in enumerate(spec.conv_layers)})
        self._luts = {f: fp8.fp8_lut(f) for f in FP8_FORMATS}
        self._lut16 = fp8.fp16_lut()

    # -- cache control ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, n: int) -> int:
        """Forget every position >= n (prefix reuse); returns the positions kept (n). KV entries past
        n are simply overwritten later; conv states are rebuilt from the stored conv inputs of
        positions n-k+1 .. n-1."""
        n = max(0, min(int(n), self.n_cached))
        self.n_cached = n
        km1 = self.spec.conv_kernel_size - 1
        for c in range(self.buf.conv_state.shape[0]):
            state = self.buf.conv_state[c]  # (C, k-1)
            state[...] = 0.0
            lo = max(0, n - km1)
            if n > lo:
                state[:, km1 - (n - lo) :] = self.buf.conv_hist[c, lo:n].T
        return n

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run `ids` (T,) at positions n_cached .. n_cached+T-1 and append them to the cache.
        Returns the last token's logits (V,) — a view into the session's buffer, valid until the next
        call — or, with all_logits, a new (T, V) array."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        T, V = ids.shape[0], self.spec.vocab_size
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if self.n_cached + T > self.max_context:
            raise BudgetError(
                f"context full: {self.n_cached} cached + {T} new tokens exceed the context length {self.max_context}"
            )
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token id out of range 0..{V - 1}")
        out = np.empty((T, V), np.float32) if all_logits else None
        for s in range(0, T, self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            self._forward_chunk(chunk, None if out is None else out[s : s + chunk.shape[0]])
        return out if all_logits else self.buf.logits

    def _forward_chunk(self, ids: np.ndarray, out_all: np.ndarray | None) -> None:
        spec, b, T = self.spec, self.buf, ids.shape[0]
        start = self.n_cached
        pos = b.positions[:T]
        np.add(b.ramp[:T], start, out=pos)
        x, h = b.x[:T], b.h[:T]
        self._embed(ids, x)
        eps = spec.rms_norm_eps
        for i in range(spec.num_hidden_layers):
            w = self.weights.layers[i]  # the owner's tensors when shared (spec.shared_layers)
            norm.rms_norm(x, w.input_layernorm, eps, h)
            if spec.layer_types[i] == "attention":
                self._attention(self._slot[i], w, h, pos, start, T)
            else:
                self._dwconv(self._slot[i], w, h, start, T)
            x += b.y[:T]
            norm.rms_norm(x, w.post_attention_layernorm, eps, h)
            self._mlp(w, h, T)
            x += b.y[:T]
        self.n_cached = start + T
        head = self.weights.output
        if out_all is not None:
            norm.rms_norm(x, self.weights.norm, eps, h)
            self._linear(h, head, out_all)
            b.logits[:] = out_all[T - 1]
        else:
            last = h[:1]  # (1, C)
            norm.rms_norm(x[T - 1 : T], self.weights.norm, eps, last)
            self._linear(last, head, b.logits.reshape(1, -1))

    def _attention(self, a: int, w, h: np.ndarray, pos: np.ndarray, start: int, T: int) -> None:
        spec, b = self.spec, self.buf
        H, Hkv, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        q, k, v = b.q[:T], b.k[:T], b.v[:T]
        self._linear(h, w.q_proj, q)
        self._linear(h, w.k_proj, k)
        self._linear(h, w.v_proj, v)
        q3, k3 = q.reshape(T, H, D), k.reshape(T, Hkv, D)
        rope.apply_rope(q3, pos, b.cos, b.sin)
        rope.apply_rope(k3, pos, b.cos, b.sin)
        if spec.use_qk_norm:  # q/k norm after RoPE, in place, as in transformers' HunYuanDenseV1Attention
            qh, kh = q.reshape(T * H, D), k.reshape(T * Hkv, D)
            norm.rms_norm(qh, w.query_layernorm, spec.rms_norm_eps, qh)
            norm.rms_norm(kh, w.key_layernorm, spec.rms_norm_eps, kh)
        kc, vc = b.k_cache[a], b.v_cache[a]  # (Hkv, S, D)
        kc[:, start : start + T] = k3.transpose(1, 0, 2)
        vc[:, start : start + T] = v.reshape(T, Hkv, D).transpose(1, 0, 2)
        o = b.attn[:T]
        attention.attention(q3, kc, vc, start, o.reshape(T, H, D), D**-0.5, b.scores)
        self._linear(o, w.o_proj, b.y[:T])

    def _dwconv(self, c: int, w, h: np.ndarray, start: int, T: int) -> None:
        b = self.buf
        b.conv_hist[c, start : start + T] = h  # kept so truncate() can rebuild the state
        mix = b.mix[:T]
        conv.dwconv_causal(h, w.conv, b.conv_state[c], mix)
        self._linear(mix, w.out_proj, b.y[:T])

    def _mlp(self, w, h: np.ndarray, T: int) -> None:
        b = self.buf
        gate, up, act = b.gate[:T], b.up[:T], b.act[:T]
        self._linear(h, w.gate_proj, gate)
        self._linear(h, w.up_proj, up)
        if self.spec.hidden_act == "relu6":
            activation.relu6_glu(gate, up, act)
        else:
            activation.swiglu(gate, up, act)
        self._linear(act, w.down_proj, b.y[:T])

    # -- weights -----------------------------------------------------------------------------------
    def _embed(self, ids: np.ndarray, out: np.ndarray) -> None:
        e = self.weights.embed  # fp16 or fp32 (weights.py refuses anything else)
        linear.embedding_rows(e.w, ids, out, self._lut16 if e.storage == "fp16" else None)

    def _linear(self, x: np.ndarray, lin: Linear, out: np.ndarray) -> None:
        """out (T, N) = x (T, K) @ W^T in the weight's stored form; GEMV for one token."""
        T = x.shape[0]
        if lin.storage in FP8_FORMATS:
            if self.activations != "none":
                x = self._fake_quant(x, lin)
            lut = self._luts[lin.storage]
            if T == 1:
                linear.gemv_fp8(x[0], lin.w, lin.scales, lut, out[0])
            else:
                linear.matmul_fp8(x, lin.w, lin.scales, lut, out)
        elif lin.storage == "fp16":
            if T == 1:
                linear.gemv_f16(x[0], lin.w, self._lut16, out[0])
            else:
                linear.matmul_f16(x, lin.w, self._lut16, out)
        elif T == 1:
            linear.gemv_f32(x[0], lin.w, out[0])
        else:
            linear.matmul_f32(x, lin.w, out)

    def _fake_quant(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """x → decode(encode(x / s)) · s before an FP8 linear, as the converter's graph does:
        s = input_scale (static, E4M3) or amax(|x|) / FP8_MAX per token (dynamic, floored at the
        smallest normal float32). Emulation mode: encode_fp8 allocates its codes array."""
        T, K = x.shape
        xq = self.buf.xq[: T * K].reshape(T, K)
        if self.activations == "static":
            fmt_, s = "e4m3", np.float32(lin.input_scale if lin.input_scale is not None else 1.0)
            np.divide(x, s, out=xq)
        else:
            fmt_ = self.activations
            s = np.abs(x).max(axis=1, keepdims=True) / np.float32(fp8.FP8_MAX[fmt_])
            s = np.maximum(s, np.finfo(np.float32).tiny).astype(np.float32)
            np.divide(x, s, out=xq)
        np.take(self._luts[fmt_], fp8.encode_fp8(xq, fmt_), out=xq, mode="clip")
        xq *= s
        return xq
