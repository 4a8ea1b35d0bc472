"""A plain numpy forward pass over Hugging Face-named fp32 weights: the independent reference for the
seed's architecture options (dwconv mixer, shared layers, relu6), which transformers has no model for.
Written from the definitions in format/spec.py, not from the graph or the kernels."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))).astype(np.float32)


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """x (T, heads, D), positions 0..T-1, NeoX rotate-half."""
    T, _, D = x.shape
    inv = 1.0 / (base ** (np.arange(0, D, 2, dtype=np.float64) / D))
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention(spec, w: dict, p: str, h: np.ndarray) -> np.ndarray:
    T = h.shape[0]
    H, Hkv, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    q = (h @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(T, H, D)
    k = (h @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(T, Hkv, D)
    v = (h @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(T, Hkv, D)
    q, k = rope(q, spec.rope_theta), rope(k, spec.rope_theta)
    if spec.use_qk_norm:
        q = rms_norm(q, w[f"{p}.self_attn.query_layernorm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w[f"{p}.self_attn.key_layernorm.weight"], spec.rms_norm_eps)
    rep = H // Hkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    scores = np.where(np.triu(np.ones((T, T), bool), 1)[None], -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", probs, v).reshape(T, H * D)
    return out @ w[f"{p}.self_attn.o_proj.weight"].T


def dwconv(spec, w: dict, p: str, h: np.ndarray) -> np.ndarray:
    """Per-channel causal conv over time (zero history), then the pointwise projection."""
    k = spec.conv_kernel_size
    kernel = w[f"{p}.mixer.conv.weight"]  # (C, k)
    padded = np.concatenate([np.zeros((k - 1, h.shape[1]), h.dtype), h], 0)
    y = sum(kernel[:, i] * padded[i : i + h.shape[0]] for i in range(k))
    return y @ w[f"{p}.mixer.out_proj.weight"].T


def forward(spec, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Logits (T, V) for token ids (T,) from position 0."""
    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{spec.shared_layers[i]}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"], spec.rms_norm_eps)
        mixer = attention if spec.layer_types[i] == "attention" else dwconv
        x = x + mixer(spec, w, p, h)
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], spec.rms_norm_eps)
        gate, up = h @ w[f"{p}.mlp.gate_proj.weight"].T, h @ w[f"{p}.mlp.up_proj.weight"].T
        act = np.clip(gate, 0, 6) if spec.hidden_act == "relu6" else gate / (1 + np.exp(-gate))
        x = x + (act * up) @ w[f"{p}.mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], spec.rms_norm_eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return (x @ head.T).astype(np.float32)
