"""Causal grouped-query attention over a per-layer KV cache (Hkv, S_max, D)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need

_FM = {"reassoc", "contract"}


@njit(cache=True, parallel=True, fastmath=_FM)
def _attention(q, k_cache, v_cache, start, out, scale, scores):
    # q, out: f32 (T, H, D) (may alias), k/v_cache: f32 (Hkv, S_max, D), scores: f32 (H, >= start+T)
    n_tok, n_heads, d = q.shape
    rep = n_heads // k_cache.shape[0]
    for h in prange(n_heads):
        kvh = h // rep
        sc = scores[h]
        for t in range(n_tok):
            n_keys = start + t + 1  # causal: keys 0 .. start+t
            qv = q[t, h]
            m = -np.inf
            for j in range(n_keys):
                kv = k_cache[kvh, j]
                s = np.float32(0.0)
                for i in range(d):
                    s += qv[i] * kv[i]
                s *= scale
                sc[j] = s
                m = max(m, s)
            total = np.float32(0.0)
            for j in range(n_keys):
                e = np.exp(sc[j] - m)
                sc[j] = e
                total += e
            o = out[t, h]  # q[t, h] is no longer read from here on, so out may alias q
            for i in range(d):
                o[i] = 0.0
            for j in range(n_keys):
                p = sc[j]
                vv = v_cache[kvh, j]
                for i in range(d):
                    o[i] += p * vv[i]
            inv = np.float32(1.0) / total
            for i in range(d):
                o[i] *= inv


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    out: np.ndarray,
    scale: float,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Causal GQA: query t (absolute position start+t) attends cached keys 0..start+t.

    q f32 (T, H, D); k_cache, v_cache f32 (Hkv, S_max, D) already holding positions < start+T;
    out f32 (T, H, D) (may be q); head h reads kv head h // (H // Hkv). scores f32 (H, >= start+T)
    is optional scratch (pass one sized (H, S_max) so decode allocates nothing).
    """
    _need("q", q, np.float32, 3)
    _need("k_cache", k_cache, np.float32, 3)
    _need("v_cache", v_cache, np.float32, 3, k_cache.shape)
    _need("out", out, np.float32, 3, q.shape)
    n_tok, n_heads, d = q.shape
    n_kv, s_max, d_kv = k_cache.shape
    if d_kv != d:
        raise ValueError(f"k_cache head_dim {d_kv} != q head_dim {d}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of k_cache heads ({n_kv})")
    if start < 0 or start + n_tok > s_max:
        raise ValueError(f"start + T = {start + n_tok} exceeds k_cache capacity {s_max}")
    if scores is None:
        scores = np.empty((n_heads, start + n_tok), dtype=np.float32)
    else:
        _need("scores", scores, np.float32, 2)
        if scores.shape[0] != n_heads or scores.shape[1] < start + n_tok:
            raise ValueError(f"scores has shape {scores.shape}, expected ({n_heads}, >= {start + n_tok})")
    _attention(q, k_cache, v_cache, int(start), out, np.float32(scale), scores)
    return out
