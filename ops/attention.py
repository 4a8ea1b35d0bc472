"""Causal grouped-query attention over a KV cache of sequence slots (slots, Hkv, S_max, D).

Every query row t carries its own slot and absolute position: it attends keys 0..pos[t] of its slot.
One prefill chunk is rows of one slot at consecutive positions; a batched decode step is one row per
slot. Work items are (row, kv head) pairs: each reads its keys and values once for the whole group of
H / Hkv query heads. The cache is float32 or float16 (uint16 half bits, decoded in the kernel).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .checks import need_array as _need
from .half import as_f32, put

_FM = {"reassoc", "contract"}


@njit(cache=True, parallel=True, fastmath=_FM)
def _attention_rows(q, k_cache, v_cache, slots, pos, out, scale, scratch):
    # q, out: f32 (T, H, D) (may alias); k/v_cache: f32 | u16 (slots, Hkv, S, D); slots, pos: i64 (T,);
    # scratch: f32 (threads, H // Hkv, >= max(pos) + 1) scores of one work item
    n_tok, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    rep = n_heads // n_kv
    for item in prange(n_tok * n_kv):
        g = item // n_tok  # kv head-major: each thread gets whole heads, so causal rows balance
        t = item % n_tok
        sc = scratch[numba.get_thread_id()]
        kc = k_cache[slots[t], g]
        vc = v_cache[slots[t], g]
        n_keys = pos[t] + 1
        for j in range(n_keys):  # scores: each key row is read once for all `rep` query heads
            kj = kc[j]
            for r in range(rep):
                qv = q[t, g * rep + r]
                s = np.float32(0.0)
                for i in range(d):
                    s += qv[i] * as_f32(kj[i])
                sc[r, j] = s * scale
        for r in range(rep):
            row = sc[r]
            m = -np.inf
            for j in range(n_keys):
                m = max(m, row[j])
            total = np.float32(0.0)
            for j in range(n_keys):
                e = np.exp(row[j] - m)
                row[j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(n_keys):
                row[j] *= inv
            o = out[t, g * rep + r]  # q of this group is no longer read: out may alias q
            for i in range(d):
                o[i] = 0.0
        for j in range(n_keys):
            vj = vc[j]
            for r in range(rep):
                p = sc[r, j]
                o = out[t, g * rep + r]
                for i in range(d):
                    o[i] += p * as_f32(vj[i])


def attention_scratch(n_heads: int, n_kv: int, context: int) -> np.ndarray:
    """The scores scratch `attention_rows` needs: f32 (threads in numba's pool, H / Hkv, context)."""
    return np.empty((numba.config.NUMBA_NUM_THREADS, n_heads // n_kv, context), np.float32)


def attention_rows(q, k_cache, v_cache, slots, pos, out, scale: float, scratch=None) -> np.ndarray:
    """Causal GQA where row t of q f32 (T, H, D) attends keys 0..pos[t] of slot slots[t] of
    k_cache, v_cache (slots, Hkv, S_max, D) float32 or uint16 half bits; out f32 (T, H, D) may be q.
    Head h reads kv head h // (H // Hkv)."""
    _need("q", q, np.float32, 3)
    if not isinstance(k_cache, np.ndarray) or k_cache.dtype not in (np.float32, np.uint16):
        raise ValueError("k_cache must be a float32 or uint16 (half bits) array")
    _need("k_cache", k_cache, k_cache.dtype, 4)
    _need("v_cache", v_cache, k_cache.dtype, 4, k_cache.shape)
    _need("out", out, np.float32, 3, q.shape)
    n_tok, n_heads, d = q.shape
    n_slots, n_kv, s_max, d_kv = k_cache.shape
    if d_kv != d:
        raise ValueError(f"k_cache head_dim {d_kv} != q head_dim {d}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of k_cache heads ({n_kv})")
    _need("slots", slots, np.int64, 1, (n_tok,))
    _need("pos", pos, np.int64, 1, (n_tok,))
    if n_tok and (slots.min() < 0 or slots.max() >= n_slots):
        raise ValueError(f"slots must lie in [0, {n_slots})")
    if n_tok and (pos.min() < 0 or pos.max() >= s_max):
        raise ValueError(f"positions must lie in [0, {s_max}): pos + 1 exceeds k_cache capacity {s_max}")
    if scratch is None:
        scratch = attention_scratch(n_heads, n_kv, s_max)
    else:
        _need("scratch", scratch, np.float32, 3)
        if scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1:] != (n_heads // n_kv, s_max):
            raise ValueError(f"scratch has shape {scratch.shape}, expected from attention_scratch()")
    _attention_rows(q, k_cache, v_cache, slots, pos, out, np.float32(scale), scratch)
    return out


def attention(q, k_cache, v_cache, start: int, out, scale: float, scores=None) -> np.ndarray:
    """One sequence: query t (absolute position start+t) attends cached keys 0..start+t.
    q f32 (T, H, D); k_cache, v_cache f32 (Hkv, S_max, D) already holding positions < start+T;
    out f32 (T, H, D) (may be q). `scores` is accepted for compatibility and ignored."""
    _need("k_cache", k_cache, np.float32, 3)
    n_tok = q.shape[0] if isinstance(q, np.ndarray) and q.ndim else 0
    if start < 0 or start + n_tok > k_cache.shape[1]:
        raise ValueError(f"start + T = {start + n_tok} exceeds k_cache capacity {k_cache.shape[1]}")
    pos = np.arange(start, start + n_tok, dtype=np.int64)
    return attention_rows(q, k_cache[None], v_cache[None], np.zeros(n_tok, np.int64), pos, out, scale)


@njit(cache=True, fastmath=_FM)
def _rope_norm_store(q, k, v, pos, slots, cos, sin, q_w, k_w, eps, k_cache, v_cache):
    # q f32 (T, H, D), k, v f32 (T, Hkv, D): RoPE (NeoX) on q, k in place, then per-head RMSNorm when
    # q_w / k_w are non-empty (Hunyuan normalises after RoPE), then k, v into cache[slots[t], :, pos[t]]
    n_tok = q.shape[0]
    half = q.shape[2] // 2
    for t in range(n_tok):
        cs = cos[pos[t]]
        sn = sin[pos[t]]
        for x, w in ((q[t], q_w), (k[t], k_w)):
            for h in range(x.shape[0]):
                xh = x[h]
                for i in range(half):
                    x1 = xh[i]
                    x2 = xh[i + half]
                    xh[i] = x1 * cs[i] - x2 * sn[i]
                    xh[i + half] = x2 * cs[i] + x1 * sn[i]
                if w.shape[0]:
                    ss = 0.0  # float64, as ops.norm
                    for i in range(xh.shape[0]):
                        ss += np.float64(xh[i]) * np.float64(xh[i])
                    inv = np.float32(1.0) / np.sqrt(np.float32(ss / xh.shape[0]) + np.float32(eps))
                    for i in range(xh.shape[0]):
                        xh[i] = w[i] * (xh[i] * inv)
        for h in range(k.shape[1]):
            kd = k_cache[slots[t], h, pos[t]]
            vd = v_cache[slots[t], h, pos[t]]
            for i in range(k.shape[2]):
                put(kd, i, k[t, h, i])
                put(vd, i, v[t, h, i])


def rope_norm_store(q, k, v, pos, slots, cos, sin, q_norm, k_norm, eps: float, k_cache, v_cache) -> None:
    """Rotate q f32 (T, H, D) and k f32 (T, Hkv, D) in place at positions pos (T,) with tables cos/sin
    (P, D/2); then, if q_norm / k_norm (D,) are given, RMSNorm each head in place; then store k and v
    (T, Hkv, D) at cache[slots[t], :, pos[t]] (cache float32 or uint16 half bits, rounded to nearest)."""
    _need("q", q, np.float32, 3)
    _need("k", k, np.float32, 3)
    _need("v", v, np.float32, 3, k.shape)
    _need("pos", pos, np.int64, 1, (q.shape[0],))
    _need("slots", slots, np.int64, 1, (q.shape[0],))
    _need("cos", cos, np.float32, 2)
    _need("sin", sin, np.float32, 2, cos.shape)
    empty = np.zeros(0, np.float32)
    qw = empty if q_norm is None else q_norm
    kw = empty if k_norm is None else k_norm
    _rope_norm_store(q, k, v, pos, slots, cos, sin, qw, kw, float(eps), k_cache, v_cache)
