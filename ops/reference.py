"""Plain numpy references for every op in this package (used by tests, never on the hot path)."""

from __future__ import annotations

import numpy as np

from .fp8 import block_size, fp8_lut


def dequantize(codes: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """u8 (N, K), f32 (N, G) -> f64 (N, K)."""
    bk = block_size(codes.shape[1], scales.shape[1])
    col = np.repeat(scales.astype(np.float64), bk, axis=1)[:, : codes.shape[1]]
    return fp8_lut(fmt)[codes].astype(np.float64) * col


def half_bits_to_f64(w: np.ndarray) -> np.ndarray:
    return w.view(np.float16).astype(np.float64)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, K) or (K,) @ w (N, K)^T in float64."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return weight * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x (T, H, D) -> rotated copy in float64, angles from float32 position * inv_freq."""
    ang = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k_cache, v_cache, start: int, scale: float, window: int = 0) -> np.ndarray:
    """q (T, H, D), caches (Hkv, S_max, D) -> (T, H, D) in float64, causal GQA; window > 0: each query sees
    the last `window` positions only (its own included)."""
    n_tok, n_heads, _ = q.shape
    rep = n_heads // k_cache.shape[0]
    out = np.empty(q.shape, np.float64)
    for h in range(n_heads):
        k = k_cache[h // rep].astype(np.float64)
        v = v_cache[h // rep].astype(np.float64)
        for t in range(n_tok):
            n_keys = start + t + 1
            lo = max(0, n_keys - window) if window else 0
            s = k[lo:n_keys] @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[lo:n_keys]
    return out


def dwconv_causal(x, weight, state, bias=None):
    """-> (y (T, C), new_state (C, k-1)) in float64."""
    k = weight.shape[1]
    xx = np.concatenate([state.T, x], axis=0).astype(np.float64)  # (k-1+T, C)
    y = np.zeros(x.shape, np.float64)
    for i in range(k):
        y += weight[:, i].astype(np.float64) * xx[i : i + x.shape[0]]
    if bias is not None:
        y += bias
    return y, xx[xx.shape[0] - (k - 1) :].T.copy()


def swiglu(gate, up):
    g = gate.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * up


def relu6_glu(gate, up):
    return np.clip(gate.astype(np.float64), 0.0, 6.0) * up


def softmax(logits):
    z = np.exp(logits.astype(np.float64) - np.max(logits))
    return z / z.sum()


def top_p_keep(probs, p: float) -> np.ndarray:
    """Boolean keep mask by full sort (HF TopPLogitsWarper on exact probabilities)."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(probs.shape, bool)
    keep[order[before < p - 1e-6]] = True
    keep[order[0]] = True
    return keep
