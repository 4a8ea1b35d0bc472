"""The calibration pass: the inputs that reach each linear when a text runs through the model being converted.

A numpy float32 forward of the spec (RMSNorm, RoPE, GQA attention with the optional q/k norm, the dwconv
mixer, shared layers, SwiGLU / ReLU6), written from the definitions in format/spec.py, run one layer at
a time: each layer's linears are quantized from the second moment H = X^T X of their inputs, and the layer is
then run with the quantized weights, so every later linear is calibrated on what the quantized model feeds it
(GPTQ's sequential order, also within a layer: o_proj sees the quantized q/k/v, down_proj the quantized
gate/up). The lm_head is calibrated last, on the final normed hidden states.

Memory: the hidden states of the calibration tokens (S*T x C floats), one layer's activations and one H
(K x K float64) at a time; the quantized weights of one layer wait here until the converter asks for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hy_edge_format import format as F
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.spec import ModelSpec
from hy_edge_ops import minifloat
from hy_edge_ops.activation import GELU_C, GELU_CUBIC
from hy_edge_ops.fp8 import dequantize_fp8
from hy_edge_ops.rope import rope_inv_freq

from .gptq import Hessian
from .quantize import Quantized

CALIBRATION_TEXT = Path(__file__).resolve().parent / "calibration" / "text.txt"
SEQUENCES = 16  # S: 16 x 256 = 4,096 tokens (H of a 576-wide input needs a few times 576 rows)
SEQ_LEN = 256  # T

Load = Callable[[str], np.ndarray]  # name -> float32 weight as the checkpoint holds it
Quantize = Callable[[str, np.ndarray, Hessian | None], Quantized]  # (name, w, H or None: no inputs) -> stored weight

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def calibration_ids(tokenizer_meta: dict[str, str], text: str, sequences: int = SEQUENCES, seq_len: int = SEQ_LEN):
    """Token ids (S, T) int64 of `text` with the model's own tokenizer (from the converter's tokenizer
    metadata): consecutive pieces of T-1 tokens, each after BOS when the model has one (else T tokens)."""
    tok_json, cfg_json = tokenizer_meta.get(F.META_TOKENIZER), tokenizer_meta.get(F.META_TOKENIZER_CONFIG)
    if tok_json is None:
        raise HyEdgeError("calibration needs the checkpoint's tokenizer to run the calibration text; it has none")
    # the runtime's tokenizer, imported here: only a calibrated conversion needs it, and importing
    # edge_runtime configures numba's kernel cache for the whole process (edge_runtime/cache_dirs.py)
    from edge_runtime.text.tokenizer import Tokenizer, TokenizerConfig

    tok = Tokenizer.from_metadata(json.loads(tok_json), TokenizerConfig.from_dict(json.loads(cfg_json or "{}")))
    ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int64)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    step = seq_len - len(bos)
    n = min(sequences, len(ids) // step)
    if n < 1:
        raise HyEdgeError(f"the calibration text holds {len(ids)} tokens, fewer than one sequence of {step}")
    rows = [np.concatenate([np.asarray(bos, np.int64), ids[i * step : (i + 1) * step]]) for i in range(n)]
    return np.stack(rows)


def dequantized(q: Quantized) -> np.ndarray:
    """The float32 weight (N, K) the runtime computes with."""
    if q.storage in ("fp16", "fp32"):
        return q.data.astype(np.float32)
    if q.storage in minifloat.FORMATS:
        return minifloat.dequantize(minifloat.unpack(q.data, q.storage), q.scale.astype(np.float32), q.storage)
    scale = np.asarray(q.scale, np.float32)
    if scale.ndim < 2:  # per tensor () or per channel (N,): one scale per row
        scale = np.broadcast_to(scale.reshape(-1, 1), (q.data.shape[0], 1))
    return dequantize_fp8(q.data, np.ascontiguousarray(scale), q.storage)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))) * w


def rope(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x (S, T, heads, D) at positions 0..T-1, NeoX rotate-half; `inv` (D/2,) the frequencies."""
    D = x.shape[-1]
    ang = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def second_moment(x: np.ndarray) -> Hessian | None:
    """H = X^T X (K, K) float64 over all tokens of x (..., K); None when it is not finite (values that
    overflow float32 on the calibration text): that linear is then rounded without its inputs."""
    x2 = x.reshape(-1, x.shape[-1])
    with np.errstate(over="ignore", invalid="ignore"):
        h = (x2.T @ x2).astype(np.float64)
    return Hessian(h) if np.isfinite(h).all() else None


class Calibration:
    """Hands the converter each linear, quantized from its calibration inputs (`take(name)`), running the
    layers forward as far as the asked-for weight needs."""

    def __init__(self, spec: ModelSpec, ids: np.ndarray, load: Load, quantize: Quantize, moments: bool = True):
        self.spec, self.ids, self.load, self.quantize = spec, ids, load, quantize
        self.moments = moments  # False: no H for any linear (a forward that only needs the outputs)
        embed = load(F.EMBED)
        self.x = embed[ids].astype(np.float16).astype(np.float32)  # (S, T, C): the runtime's FP16 embedding
        if spec.embed_scale != 1.0:  # Gemma
            self.x *= np.float32(spec.embed_scale)
        self.next_layer = 0
        self.ready: dict[str, Quantized] = {}
        self.shared = {j for i, j in enumerate(spec.shared_layers) if j != i}  # owners a later layer reuses
        self.kept: dict[int, dict[str, np.ndarray]] = {}  # owner layer -> its dequantized linears

    def take(self, name: str) -> Quantized:
        if name not in self.ready:
            m = _LAYER.match(name)
            last = int(m.group(1)) if m else self.spec.num_hidden_layers - 1
            # a checkpoint whose values overflow float32 here ends in non-finite inputs (second_moment: None),
            # not in numpy's warnings; the weights themselves are checked where they are quantized
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                while self.next_layer <= last:
                    self._layer(self.next_layer)
                    self.next_layer += 1
                if name == F.LM_HEAD:
                    h = rms_norm(self.x, self.norm(F.FINAL_NORM), self.spec.rms_norm_eps)
                    self.ready[name] = self.quantize(name, self.load(name), self._moment(h))
        if name not in self.ready:  # asked twice, or out of layer order: a converter bug, not a user error
            raise RuntimeError(f"calibration: '{name}' was not produced by the calibration pass")
        return self.ready.pop(name)

    def _moment(self, x: np.ndarray) -> Hessian | None:
        return second_moment(x) if self.moments else None

    def norm(self, name: str) -> np.ndarray:
        """An RMSNorm's weight as applied: 1 + w for spec.norm_plus_one (Gemma)."""
        w = self.load(name)
        return w + np.float32(1.0) if self.spec.norm_plus_one else w

    # -- one layer ------------------------------------------------------------------------------
    def _linear(self, layer: dict, owner: int, short: str, h: np.ndarray, H: Hessian | None) -> np.ndarray:
        """h @ W^T with W the stored (quantized) weight; quantizes it from H first unless the layer is a
        shared one whose owner already did."""
        if short not in layer:
            name = f"{F.layer_prefix(owner)}.{short}.weight"
            q = self.quantize(name, self.load(name), H)
            layer[short] = dequantized(q)
            self.ready[name] = q
        w = layer[short]
        return (h.reshape(-1, h.shape[-1]) @ w.T).reshape(*h.shape[:-1], w.shape[0])  # one GEMM, not S

    def _layer(self, i: int) -> None:
        spec, owner = self.spec, self.spec.shared_layers[i]
        p = F.layer_prefix(owner)
        layer = self.kept.get(owner, {})
        eps = spec.rms_norm_eps
        h = rms_norm(self.x, self.norm(f"{p}.input_layernorm.weight"), eps)
        if spec.layer_types[i] == "attention":
            y = self._attention(layer, owner, h, spec.window(i))
        else:
            y = self._dwconv(layer, owner, h)
        if spec.sandwich_norms:  # Gemma: post_attention_layernorm on the attention's output
            y = rms_norm(y, self.norm(f"{p}.post_attention_layernorm.weight"), eps)
        self.x = self.x + y
        pre_mlp = "pre_feedforward_layernorm" if spec.sandwich_norms else "post_attention_layernorm"
        h = rms_norm(self.x, self.norm(f"{p}.{pre_mlp}.weight"), eps)
        H = None if "mlp.gate_proj" in layer else self._moment(h)
        gate = self._linear(layer, owner, "mlp.gate_proj", h, H)
        up = self._linear(layer, owner, "mlp.up_proj", h, H)
        # SiLU as x * sigmoid(x) with sigmoid(x) = (1 + tanh(x / 2)) / 2: no exp to overflow for large |x|
        if spec.hidden_act == "relu6":
            act = np.clip(gate, 0, 6)
        elif spec.hidden_act == "gelu_tanh":
            act = gate * (0.5 + 0.5 * np.tanh(GELU_C / 2 * (gate + GELU_CUBIC * gate**3)))
        else:
            act = gate * (0.5 + 0.5 * np.tanh(0.5 * gate))
        a = act * up
        del gate, up, act
        H = None if "mlp.down_proj" in layer else self._moment(a)
        y = self._linear(layer, owner, "mlp.down_proj", a, H)
        if spec.sandwich_norms:
            y = rms_norm(y, self.norm(f"{p}.post_feedforward_layernorm.weight"), eps)
        self.x = self.x + y
        if owner in self.shared:
            self.kept[owner] = layer

    def _attention(self, layer: dict, owner: int, h: np.ndarray, window: int = 0) -> np.ndarray:
        spec = self.spec
        S, T, _ = h.shape
        Hq, Hkv, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        H = None if "self_attn.q_proj" in layer else self._moment(h)
        p = F.layer_prefix(owner)

        def proj(x: str, heads: int) -> np.ndarray:
            y = self._linear(layer, owner, f"self_attn.{x}_proj", h, H)
            if spec.qkv_bias:  # Qwen2
                y = y + self.load(f"{p}.self_attn.{x}_proj.bias")
            return y.reshape(S, T, heads, D)

        def qk_norm(q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            qn, kn = F.qk_norm_names(spec)
            eps = spec.rms_norm_eps
            return (
                rms_norm(q, self.norm(f"{p}.self_attn.{qn}.weight"), eps),
                rms_norm(k, self.norm(f"{p}.self_attn.{kn}.weight"), eps),
            )

        q, k, v = proj("q", Hq), proj("k", Hkv), proj("v", Hkv)
        if window:  # Gemma's sliding layers: their own RoPE base
            inv = rope_inv_freq(spec.head_dim, spec.rope_local_theta)
        else:
            inv = rope_inv_freq(
                spec.head_dim, spec.rope_theta, spec.rope_llama3, spec.rope_freq_factors, spec.rope_linear
            )
        if spec.use_qk_norm and spec.qk_norm_before_rope:  # Qwen3Attention
            q, k = qk_norm(q, k)
        q, k = rope(q, inv), rope(k, inv)
        if spec.use_qk_norm and not spec.qk_norm_before_rope:  # after RoPE: HunYuanDenseV1Attention
            q, k = qk_norm(q, k)
        # batched matmuls (BLAS) rather than einsum: GQA as (S, Hkv, rep, T, D) against (S, Hkv, 1, D, T)
        q = q.reshape(S, T, Hkv, Hq // Hkv, D).transpose(0, 2, 3, 1, 4)
        scores = q @ (k.transpose(0, 2, 3, 1)[:, :, None] * np.float32(spec.softmax_scale))  # (S, Hkv, rep, T, T)
        hidden = np.triu(np.ones((T, T), bool), 1)  # keys after the query, and with a window those before it
        scores[..., hidden | (np.tril(np.ones((T, T), bool), -window) if window else False)] = -np.inf
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        att = scores @ v.transpose(0, 2, 1, 3)[:, :, None]  # (S, Hkv, rep, T, D)
        att = att.transpose(0, 3, 1, 2, 4).reshape(S, T, Hq * D)
        del scores
        H = None if "self_attn.o_proj" in layer else self._moment(att)
        return self._linear(layer, owner, "self_attn.o_proj", att, H)

    def _dwconv(self, layer: dict, owner: int, h: np.ndarray) -> np.ndarray:
        """Per-channel causal conv over time (zero history), then the pointwise projection."""
        k = self.spec.conv_kernel_size
        kernel = self.load(f"{F.layer_prefix(owner)}.mixer.conv.weight")  # (C, k)
        padded = np.concatenate([np.zeros((h.shape[0], k - 1, h.shape[2]), h.dtype), h], axis=1)
        y = sum(kernel[:, j] * padded[:, j : j + h.shape[1]] for j in range(k))
        H = None if "mixer.out_proj" in layer else self._moment(y)
        return self._linear(layer, owner, "mixer.out_proj", y, H)
