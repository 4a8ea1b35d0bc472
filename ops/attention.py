"""Causal grouped-query attention over a KV cache of sequence slots (slots, Hkv, S_max, D).

Every query row t carries its own slot and absolute position: it attends keys 0..pos[t] of its slot.
One prefill chunk is rows of one slot at consecutive positions; a batched decode step is one row per
slot. Work items are (row, kv head) pairs: each reads its keys and values once for the whole group of
H / Hkv query heads. The cache is float32, float16 (uint16 half bits) or FP8 (int8 rows of E4M3 codes
and their scale), decoded in the kernels (hy_edge_ops.kvrow).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .checks import need_array as _need
from .expf import expf
from .half import acc_scale, as_f32
from .kvrow import STORAGE, factor, row_length, store

_FM = {"reassoc", "contract"}


@njit(cache=True, fastmath=_FM, inline="always")
def _softmax_prefix(row, lo, n, n_all):
    # row[lo:n] = softmax(row[lo:n]); row[:lo] = 0 (keys before a sliding window) and row[n:n_all] = 0
    # (keys past the query's position)
    for j in range(lo):
        row[j] = 0.0
    m = -np.inf
    for j in range(lo, n):
        m = max(m, row[j])
    total = np.float32(0.0)
    for j in range(lo, n):
        e = expf(row[j] - m)
        row[j] = e
        total += e
    inv = np.float32(1.0) / total
    for j in range(lo, n):
        row[j] *= inv
    for j in range(n, n_all):
        row[j] = 0.0


@njit(cache=True, inline="always")
def _first_key(n_keys, window):
    # the first key a query with n_keys keys before it (itself included) sees: 0, or with a sliding
    # window (window > 0) the window's first
    return max(0, n_keys - window) if window > 0 else 0


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attention_rows(q, k_cache, v_cache, slots, pos, out, scale, scratch, window):
    # q, out: f32 (T, H, D) (may alias); k/v_cache: f32 | u16 | i8 (slots, Hkv, S, D [+ 4]); slots, pos: i64 (T,);
    # scratch: f32 (threads, H // Hkv, >= max(pos) + 1) scores of one work item; window > 0: a query sees
    # the last `window` positions only (itself included)
    n_tok, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    rep = n_heads // n_kv
    for item in prange(n_tok * n_kv):
        g = item // n_tok  # kv head-major: each thread gets whole heads, so causal rows balance
        t = item % n_tok
        sc = scratch[numba.get_thread_id()]
        kc = k_cache[slots[t], g]
        vc = v_cache[slots[t], g]
        acc = acc_scale(kc)  # 1 and factor() 1 unless FP8 (hy_edge_ops.kvrow)
        n_keys = pos[t] + 1
        lo = _first_key(n_keys, window)
        for j in range(lo, n_keys):  # scores: each key row is read once for all `rep` query heads
            kj = kc[j]
            f = factor(kj, d) * scale
            for r in range(rep):
                qv = q[t, g * rep + r]
                s = np.float32(0.0)
                for i in range(d):
                    s += qv[i] * as_f32(kj[i])
                sc[r, j] = (s * acc) * f
        for r in range(rep):
            _softmax_prefix(sc[r], lo, n_keys, n_keys)
            o = out[t, g * rep + r]  # q of this group is no longer read: out may alias q
            for i in range(d):
                o[i] = 0.0
        for j in range(lo, n_keys):
            vj = vc[j]
            f = factor(vj, d)
            for r in range(rep):
                p = sc[r, j] * f
                o = out[t, g * rep + r]
                for i in range(d):
                    o[i] += p * as_f32(vj[i])
        if acc != 1.0:  # FP8 values were summed 2**-60 low (factor() folds in the other half)
            for r in range(rep):
                o = out[t, g * rep + r]
                for i in range(d):
                    o[i] *= acc


QB = 16  # query rows of a prefill chunk per work item of `_attention_chunk`


@njit(cache=True, fastmath=_FM, inline="always")
def _query(q, t0, g, rep, i):
    # query vector i of a work item: row t0 + i // rep, head g * rep + i % rep
    return q[t0 + i // rep, g * rep + i % rep]


@njit(cache=True, fastmath=_FM, inline="always")
def _dot4x4(x0, x1, x2, x3, y0, y1, y2, y3, n):
    # the 16 dot products x_u[:n] . y_w[:n] (y decoded from the cache's storage): each y load serves 4
    # x vectors and each x load 4 y vectors; returns a<u><w>
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for e in range(n):
        v0 = as_f32(y0[e])
        v1 = as_f32(y1[e])
        v2 = as_f32(y2[e])
        v3 = as_f32(y3[e])
        u0 = x0[e]
        u1 = x1[e]
        u2 = x2[e]
        u3 = x3[e]
        a00 += u0 * v0
        a01 += u0 * v1
        a02 += u0 * v2
        a03 += u0 * v3
        a10 += u1 * v0
        a11 += u1 * v1
        a12 += u1 * v2
        a13 += u1 * v3
        a20 += u2 * v0
        a21 += u2 * v1
        a22 += u2 * v2
        a23 += u2 * v3
        a30 += u3 * v0
        a31 += u3 * v1
        a32 += u3 * v2
        a33 += u3 * v3
    return a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33


@njit(cache=True, inline="always")
def _put4(row, j, n, acc, f, a, b, c, d):
    # row[j..j+3] = (a, b, c, d) * acc * f[0..3], the entries below n only (scores: f = the keys' factor()
    # times the softmax scale; P.V outputs: 1)
    row[j] = (a * acc) * f[0]
    if j + 1 < n:
        row[j + 1] = (b * acc) * f[1]
    if j + 2 < n:
        row[j + 2] = (c * acc) * f[2]
    if j + 3 < n:
        row[j + 3] = (d * acc) * f[3]


@njit(cache=True, fastmath=_FM, inline="always")
def _transpose_values(vc, vt, j0, j1):
    # vt[:, j0:j1] = decoded vc[j0:j1].T (FP8 rows times their scale), 16 value rows (8 KB at D = 128) at
    # a time so they stay in L1
    d = vt.shape[0]
    acc = acc_scale(vc)
    for jb in range(j0, j1, 16):
        for e in range(d):
            for j in range(jb, min(j1, jb + 16)):
                vt[e, j] = (as_f32(vc[j, e]) * acc) * factor(vc[j], d)


@njit(cache=True, fastmath=_FM)
def _chunk_item(q, k_cache, v_cache, slot, p0, out, scale, sc, vt, done, g, t0, t1, window):
    # one work item of _attention_chunk: kv head g, query rows t0 .. t1 (a function of its own, compiled
    # once, not inlined into the parallel loop: a fifth of the first run's compile time went there);
    # sc, vt: this thread's scratch rows; done: its (kv head in vt, keys transposed)
    n_tok, n_heads, d = q.shape
    rep = n_heads // k_cache.shape[1]
    nq = (t1 - t0) * rep
    n_keys = p0 + t1
    kc = k_cache[slot, g]
    acc = acc_scale(kc)
    for i in range(0, nq, 4):  # queries past nq / keys past n_keys repeat the last and are not written
        i1, i2, i3 = min(i + 1, nq - 1), min(i + 2, nq - 1), min(i + 3, nq - 1)
        x0, x1 = _query(q, t0, g, rep, i), _query(q, t0, g, rep, i1)
        x2, x3 = _query(q, t0, g, rep, i2), _query(q, t0, g, rep, i3)
        for j in range(0, p0 + t0 + i3 // rep + 1, 4):  # the keys of the last of the 4
            j1, j2, j3 = min(j + 1, n_keys - 1), min(j + 2, n_keys - 1), min(j + 3, n_keys - 1)
            a = _dot4x4(x0, x1, x2, x3, kc[j], kc[j1], kc[j2], kc[j3], d)
            f0, f1 = factor(kc[j], d) * scale, factor(kc[j1], d) * scale
            f = (f0, f1, factor(kc[j2], d) * scale, factor(kc[j3], d) * scale)
            _put4(sc[i], j, n_keys, acc, f, a[0], a[1], a[2], a[3])
            if i + 1 < nq:
                _put4(sc[i1], j, n_keys, acc, f, a[4], a[5], a[6], a[7])
            if i + 2 < nq:
                _put4(sc[i2], j, n_keys, acc, f, a[8], a[9], a[10], a[11])
            if i + 3 < nq:
                _put4(sc[i3], j, n_keys, acc, f, a[12], a[13], a[14], a[15])
    for i in range(nq):  # q is no longer read by this item: out may alias it from here on
        n = p0 + t0 + i // rep + 1  # with a sliding window, the keys before it get probability 0
        _softmax_prefix(sc[i], _first_key(n, window), n, n_keys)
    if done[0] != g:
        done[0] = g
        done[1] = 0
    if done[1] < n_keys:
        _transpose_values(v_cache[slot, g], vt, done[1], n_keys)
        done[1] = n_keys
    one = np.float32(1.0)
    ones = (one, one, one, one)
    for i in range(0, nq, 4):
        i1, i2, i3 = min(i + 1, nq - 1), min(i + 2, nq - 1), min(i + 3, nq - 1)
        n = p0 + t0 + i3 // rep + 1  # keys of the last of the 4 (P is 0 past the others' own)
        p_0, p_1, p_2, p_3 = sc[i], sc[i1], sc[i2], sc[i3]
        o0, o1 = _query(out, t0, g, rep, i), _query(out, t0, g, rep, i1)
        o2, o3 = _query(out, t0, g, rep, i2), _query(out, t0, g, rep, i3)
        for e in range(0, d, 4):
            e1, e2, e3 = min(e + 1, d - 1), min(e + 2, d - 1), min(e + 3, d - 1)
            a = _dot4x4(p_0, p_1, p_2, p_3, vt[e], vt[e1], vt[e2], vt[e3], n)
            _put4(o0, e, d, one, ones, a[0], a[1], a[2], a[3])
            if i + 1 < nq:
                _put4(o1, e, d, one, ones, a[4], a[5], a[6], a[7])
            if i + 2 < nq:
                _put4(o2, e, d, one, ones, a[8], a[9], a[10], a[11])
            if i + 3 < nq:
                _put4(o3, e, d, one, ones, a[12], a[13], a[14], a[15])


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attention_chunk(q, k_cache, v_cache, slot, p0, out, scale, scratch, vt_scratch, window):
    # One sequence's prefill chunk: row t of q, out f32 (T, H, D) (may alias) is at position p0 + t of
    # slot `slot` of k/v_cache f32 | u16 | i8 (slots, Hkv, S, D [+ 4]) and attends keys 0..p0 + t (the
    # last `window` of them when window > 0: scores are computed for all, the earlier ones get weight 0).
    # scratch: f32 (threads, >= QB * H // Hkv, >= p0 + T); vt_scratch: f32 (threads, D, >= p0 + T).
    # Work items are (kv head, QB rows) with their QB * rep queries. Scores: 4 queries x 4 keys per
    # block. P.V: each thread keeps the values of its current kv head transposed (extended as its items
    # reach further keys: with kv head-major items, once per head and thread), so that 4 queries x 4 dims
    # per block are again dot products over contiguous memory.
    n_tok, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    n_heads // n_kv
    n_blk = (n_tok + QB - 1) // QB
    done = np.full((vt_scratch.shape[0], 2), -1, np.int64)  # per thread: kv head in vt, keys transposed
    for item in prange(n_kv * n_blk):
        g = item // n_blk  # kv head-major: each thread gets whole heads, so causal blocks balance
        t0 = (item % n_blk) * QB
        t1 = min(n_tok, t0 + QB)
        tid = numba.get_thread_id()
        _chunk_item(
            q, k_cache, v_cache, slot, p0, out, scale, scratch[tid], vt_scratch[tid], done[tid], g, t0, t1, window
        )


def scratch_shape(n_heads: int, n_kv: int, context: int) -> tuple[int, int, int]:
    """The scores scratch `attention_rows` and `attention_chunk` need: (threads in numba's pool,
    QB * H / Hkv, context), float32."""
    return numba.config.NUMBA_NUM_THREADS, QB * (n_heads // n_kv), context


def attention_scratch(n_heads: int, n_kv: int, context: int) -> np.ndarray:
    return np.empty(scratch_shape(n_heads, n_kv, context), np.float32)


def values_scratch_shape(head_dim: int, context: int) -> tuple[int, int, int]:
    """The transposed-values scratch `attention_chunk` needs: (threads in numba's pool, D, context + 16),
    float32 (the 16: rows whose distance is a multiple of 4 KB would share few cache sets)."""
    return numba.config.NUMBA_NUM_THREADS, head_dim, context + 16


def attention_rows(q, k_cache, v_cache, slots, pos, out, scale: float, scratch=None, window: int = 0) -> np.ndarray:
    """Causal GQA where row t of q f32 (T, H, D) attends keys 0..pos[t] (with window > 0: the last `window`
    of them, pos[t] included) of slot slots[t] of
    k_cache, v_cache (slots, Hkv, S_max, row) in a KV storage of hy_edge_ops.kvrow (float32, uint16 half
    bits, or int8 E4M3 rows of D codes and a scale); out f32 (T, H, D) may be q.
    Head h reads kv head h // (H // Hkv)."""
    n_heads, n_slots, n_kv, s_max = _check_caches(q, k_cache, v_cache, out)
    n_tok = q.shape[0]
    _need("slots", slots, np.int64, 1, (n_tok,))
    _need("pos", pos, np.int64, 1, (n_tok,))
    if n_tok and (slots.min() < 0 or slots.max() >= n_slots):
        raise ValueError(f"slots must lie in [0, {n_slots})")
    if n_tok and (pos.min() < 0 or pos.max() >= s_max):
        raise ValueError(f"positions must lie in [0, {s_max}): pos + 1 exceeds k_cache capacity {s_max}")
    scratch = _scratch(scratch, n_heads, n_kv, s_max)
    _attention_rows(q, k_cache, v_cache, slots, pos, out, np.float32(scale), scratch, _window(window))
    return out


def _window(window: int) -> np.int64:
    if not (isinstance(window, (int, np.integer)) and window >= 0):
        raise ValueError(f"window must be an integer >= 0, got {window!r}")
    return np.int64(window)


def _check_caches(q, k_cache, v_cache, out) -> tuple[int, int, int, int]:
    _need("q", q, np.float32, 3)
    kinds = {np.dtype(t): kind for kind, t in STORAGE.items()}
    if not isinstance(k_cache, np.ndarray) or k_cache.dtype not in kinds:
        raise ValueError("k_cache must be a float32, uint16 (half bits) or int8 (E4M3 rows) array")
    _need("k_cache", k_cache, k_cache.dtype, 4)
    _need("v_cache", v_cache, k_cache.dtype, 4, k_cache.shape)
    _need("out", out, np.float32, 3, q.shape)
    n_heads, d = q.shape[1:]
    n_slots, n_kv, s_max, row = k_cache.shape
    want = row_length(kinds[k_cache.dtype], d)
    if row != want:
        raise ValueError(f"k_cache rows hold {row} elements, expected head_dim {d} + {want - d}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of k_cache heads ({n_kv})")
    return n_heads, n_slots, n_kv, s_max


def _scratch(scratch, n_heads: int, n_kv: int, s_max: int) -> np.ndarray:
    if scratch is None:
        return attention_scratch(n_heads, n_kv, s_max)
    _need("scratch", scratch, np.float32, 3)
    want = scratch_shape(n_heads, n_kv, s_max)
    if any(have < need for have, need in zip(scratch.shape, want, strict=True)):
        raise ValueError(f"scratch has shape {scratch.shape}, expected from attention_scratch()")
    return scratch


def attention_chunk(
    q, k_cache, v_cache, slot: int, start: int, out, scale: float, scratch=None, values_scratch=None, window: int = 0
) -> np.ndarray:
    """Causal GQA for one sequence's chunk: row t of q f32 (T, H, D) is at position start + t of slot
    `slot` of k_cache, v_cache (slots, Hkv, S_max, row) as `attention_rows`'s (already holding
    positions < start + T) and attends keys 0..start + t; out f32 (T, H, D) may be q. The same result as
    `attention_rows` with slots = slot, pos = start + arange(T), faster from a few rows on."""
    n_heads, n_slots, n_kv, s_max = _check_caches(q, k_cache, v_cache, out)
    if not 0 <= slot < n_slots:
        raise ValueError(f"slot must lie in [0, {n_slots})")
    if start < 0 or start + q.shape[0] > s_max:
        raise ValueError(f"start + T = {start + q.shape[0]} exceeds k_cache capacity {s_max}")
    scratch = _scratch(scratch, n_heads, n_kv, s_max)
    want = values_scratch_shape(q.shape[2], s_max)
    if values_scratch is None:
        values_scratch = np.empty(want, np.float32)
    else:
        _need("values_scratch", values_scratch, np.float32, 3)
        if any(have < need for have, need in zip(values_scratch.shape, want, strict=True)):
            raise ValueError(f"values_scratch has shape {values_scratch.shape}, expected {want}")
    slot, start = np.int64(slot), np.int64(start)
    _attention_chunk(q, k_cache, v_cache, slot, start, out, np.float32(scale), scratch, values_scratch, _window(window))
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


@njit(cache=True, fastmath=_FM, inline="always")
def _head_rope(xh, cs, sn, half):
    # NeoX RoPE of one head in place
    for i in range(half):
        x1 = xh[i]
        x2 = xh[i + half]
        xh[i] = x1 * cs[i] - x2 * sn[i]
        xh[i + half] = x2 * cs[i] + x1 * sn[i]


@njit(cache=True, fastmath=_FM, inline="always")
def _head_norm(xh, w, eps):
    # RMSNorm of one head in place
    ss = 0.0  # float64, as ops.norm
    for i in range(xh.shape[0]):
        ss += np.float64(xh[i]) * np.float64(xh[i])
    inv = np.float32(1.0) / np.sqrt(np.float32(ss / xh.shape[0]) + np.float32(eps))
    for i in range(xh.shape[0]):
        xh[i] = w[i] * (xh[i] * inv)


@njit(cache=True, nogil=True, fastmath=_FM)
def _rope_norm_store(q, k, v, pos, slots, cos, sin, q_w, k_w, q_b, k_b, v_b, norm_first, eps, k_cache, v_cache):
    # q f32 (T, H, D), k, v f32 (T, Hkv, D): the projections' biases added when q_b / k_b / v_b (H*D or
    # Hkv*D) are non-empty (Qwen2); RoPE (NeoX) on q, k in place and per-head RMSNorm when q_w / k_w are
    # non-empty, after RoPE (Hunyuan) or before it when norm_first (Qwen3); then k, v into
    # cache[slots[t], :, pos[t]]
    n_tok = q.shape[0]
    d = q.shape[2]
    half = d // 2
    for t in range(n_tok):
        cs = cos[pos[t]]
        sn = sin[pos[t]]
        for x, w, b in ((q[t], q_w, q_b), (k[t], k_w, k_b)):
            for h in range(x.shape[0]):
                xh = x[h]
                if b.shape[0]:
                    for i in range(d):
                        xh[i] += b[h * d + i]
                if norm_first and w.shape[0]:
                    _head_norm(xh, w, eps)
                _head_rope(xh, cs, sn, half)
                if not norm_first and w.shape[0]:
                    _head_norm(xh, w, eps)
        for h in range(k.shape[1]):
            if v_b.shape[0]:
                vh = v[t, h]
                for i in range(d):
                    vh[i] += v_b[h * d + i]
            store(k_cache[slots[t], h, pos[t]], k[t, h])
            store(v_cache[slots[t], h, pos[t]], v[t, h])


def rope_norm_store(
    q, k, v, pos, slots, cos, sin, q_norm, k_norm, eps: float, k_cache, v_cache,
    biases=(None, None, None), norm_first: bool = False,
) -> None:  # fmt: skip
    """Add the q/k/v projections' `biases` (H*D,), (Hkv*D,), (Hkv*D,) when given; rotate q f32 (T, H, D)
    and k f32 (T, Hkv, D) in place at positions pos (T,) with tables cos/sin (P, D/2); if q_norm / k_norm
    (D,) are given, RMSNorm each head in place, after the rotation or before it (`norm_first`); then
    store k and v (T, Hkv, D) at cache[slots[t], :, pos[t]] in the cache's storage (hy_edge_ops.kvrow.store)."""
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
    for name, b, x in zip(("q bias", "k bias", "v bias"), biases, (q, k, v), strict=True):
        if b is not None:
            _need(name, b, np.float32, 1, (x.shape[1] * x.shape[2],))
    qb, kb, vb = (empty if b is None else b for b in biases)
    _rope_norm_store(q, k, v, pos, slots, cos, sin, qw, kw, qb, kb, vb, bool(norm_first), float(eps), k_cache, v_cache)
