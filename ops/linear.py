"""Linear layers on HF-layout weights (N, K): FP8 / FP16 GEMV for decode, tiled GEMM for prefill.

Weights stay in their stored dtype; each output row is a contiguous dot over K with the decode
(and the per-block scale) fused in. When the decode table passed in is the canonical one
(`fp8_lut(fmt)` / `fp16_lut()`), codes are decoded with integer bit moves that vectorise; any other
table falls back to a (slower) gather through the table.

FP8/FP16 values are rebuilt as float32 bit patterns pre-scaled by 2**-120 (E4M3) or 2**-112
(E5M2, FP16) and the block sum is rescaled once; products below 2**-126 in that domain lose
precision, an absolute error of at most 2**-29 * scale per term (E4M3), negligible next to
float32 accumulation error for real activations.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need
from .fp8 import E4M3, E5M2, block_size, fp8_lut, fp16_lut

_FM = {"reassoc", "contract"}  # lets LLVM vectorise the reductions; keeps inf/NaN semantics
_GATHER, _BITS_E4M3, _BITS_E5M2, _BITS_F16 = 0, 1, 2, 3
_POW2 = {_GATHER: 1.0, _BITS_E4M3: 2.0**120, _BITS_E5M2: 2.0**112, _BITS_F16: 2.0**112}
_RB = 16  # rows per block in the fused small-T kernel


@njit(cache=True, fastmath=_FM, inline="always")
def _dot_block(x, row, lut, mode):
    # x: f32 (B,), row: u8|u16 (B,) (one scale block); sum of decode(row[k]) * x[k], pre-scaled by
    # 1/_POW2. Zero-based loops over slices vectorise; range(k0, k1) on the 2-D array did not.
    p = np.float32(0.0)
    if mode == 1:
        for k in range(row.shape[0]):
            c = np.int32(row[k])
            low = c & 0x7F
            b = np.int32(((c & 0x80) << 24) | (low << 20) | ((-((low + 1) >> 7)) & 0x7F800000))
            p += b.view(np.float32) * x[k]
    elif mode == 2:
        for k in range(row.shape[0]):
            c = np.int32(row[k])
            b = np.int32(((c & 0x80) << 24) | ((c & 0x7F) << 21) | ((-(((c & 0x7C) + 4) >> 7)) & 0x7F800000))
            p += b.view(np.float32) * x[k]
    elif mode == 3:
        for k in range(row.shape[0]):
            c = np.int32(row[k])
            b = np.int32(((c & 0x8000) << 16) | ((c & 0x7FFF) << 13) | ((-(((c & 0x7C00) + 0x400) >> 15)) & 0x7F800000))
            p += b.view(np.float32) * x[k]
    else:
        for k in range(row.shape[0]):
            p += lut[row[k]] * x[k]
    return p


@njit(cache=True, parallel=True, fastmath=_FM)
def _gemv_q(x, w, scales, lut, out, bk, mode, pow2):
    # x: f32 (K,), w: u8|u16 (N, K), scales: f32 (N, G) or (1, 1) unused when bk == K and
    # scales[0, 0] == 1, out: f32 (N,). Scale applied once per block.
    n_rows, k_dim = w.shape
    per_row = scales.shape[0] == n_rows
    for n in prange(n_rows):
        row = w[n]
        acc = np.float32(0.0)
        for k0 in range(0, k_dim, bk):
            k1 = min(k_dim, k0 + bk)
            p = _dot_block(x[k0:k1], row[k0:k1], lut, mode)
            s = scales[n, k0 // bk] if per_row else scales[0, 0]
            # undo the 2**-120 / 2**-112 pre-scale before the (often tiny) scale can underflow it
            acc += (p * np.float32(pow2)) * s
        out[n] = acc


@njit(cache=True, parallel=True, fastmath=_FM)
def _matmul_q(x, w, scales, lut, out, bk):
    # x: f32 (T, K), w: u8|u16 (N, K), out: f32 (T, N); one parallel region for the whole product
    # (no BLAS thread hand-offs): blocks of _RB rows are decoded once, then dotted with every token.
    n_rows, k_dim = w.shape
    n_tok = x.shape[0]
    per_row = scales.shape[0] == n_rows
    for b in prange((n_rows + _RB - 1) // _RB):
        r0 = b * _RB
        nr = min(n_rows, r0 + _RB) - r0
        buf = np.empty((_RB, k_dim), np.float32)  # prefill only; 64 KB at K=1024
        for i in range(nr):
            row = w[r0 + i]
            dst = buf[i]
            for k0 in range(0, k_dim, bk):
                s = scales[r0 + i, k0 // bk] if per_row else scales[0, 0]
                for k in range(k0, min(k_dim, k0 + bk)):
                    dst[k] = lut[row[k]] * s
        for t in range(0, n_tok - 1, 2):  # two tokens per pass halves the loads of buf
            x0 = x[t]
            x1 = x[t + 1]
            for i in range(nr):
                d = buf[i]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                for k in range(k_dim):
                    a0 += d[k] * x0[k]
                    a1 += d[k] * x1[k]
                out[t, r0 + i] = a0
                out[t + 1, r0 + i] = a1
        if n_tok % 2:
            xl = x[n_tok - 1]
            for i in range(nr):
                d = buf[i]
                a = np.float32(0.0)
                for k in range(k_dim):
                    a += d[k] * xl[k]
                out[n_tok - 1, r0 + i] = a


_canon_seen: list = [None, _GATHER]  # [last non-identical table seen, its mode]: one-slot memo


def _mode8(lut: np.ndarray) -> int:
    if lut is fp8_lut(E4M3):
        return _BITS_E4M3
    if lut is fp8_lut(E5M2):
        return _BITS_E5M2
    if _canon_seen[0] is lut:
        return _canon_seen[1]
    mode = _GATHER
    for fmt, m in ((E4M3, _BITS_E4M3), (E5M2, _BITS_E5M2)):
        if np.array_equal(lut, fp8_lut(fmt), equal_nan=True):
            mode = m
    _canon_seen[0], _canon_seen[1] = lut, mode
    return mode


def _mode16(lut16: np.ndarray) -> int:
    if lut16 is fp16_lut() or np.array_equal(lut16, fp16_lut(), equal_nan=True):
        return _BITS_F16
    return _GATHER


_ONE = np.ones((1, 1), dtype=np.float32)


def _check_fp8(w, scales, lut) -> int:
    _need("w", w, np.uint8, 2)
    _need("lut", lut, np.float32, 1, (256,))
    _need("scales", scales, np.float32, 2)
    n_rows, k_dim = w.shape
    if scales.shape[0] != n_rows or not 1 <= scales.shape[1] <= max(k_dim, 1):
        raise ValueError(f"scales has shape {scales.shape}, expected ({n_rows}, G) with 1 <= G <= {k_dim}")
    return block_size(k_dim, scales.shape[1])


def gemv_fp8(x: np.ndarray, w: np.ndarray, scales: np.ndarray, lut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[n] = sum_k lut[w[n, k]] * scales[n, k // Bk] * x[k]; x f32 (K,), w u8 (N, K), out f32 (N,)."""
    bk = _check_fp8(w, scales, lut)
    _need("x", x, np.float32, 1, (w.shape[1],))
    _need("out", out, np.float32, 1, (w.shape[0],))
    mode = _mode8(lut)
    _gemv_q(x, w, scales, lut, out, bk, mode, _POW2[mode])
    return out


def gemv_f16(x: np.ndarray, w: np.ndarray, lut16: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = decode(w) @ x for raw IEEE half bits; x f32 (K,), w u16 (N, K), out f32 (N,)."""
    _need("w", w, np.uint16, 2)
    _need("lut16", lut16, np.float32, 1, (65536,))
    _need("x", x, np.float32, 1, (w.shape[1],))
    _need("out", out, np.float32, 1, (w.shape[0],))
    mode = _mode16(lut16)
    _gemv_q(x, w, _ONE, lut16, out, max(1, w.shape[1]), mode, _POW2[mode])
    return out


def _check_tokens(x, out, k_dim: int, n_rows: int) -> None:
    _need("x", x, np.float32, 2)
    if x.shape[1] != k_dim:
        raise ValueError(f"x has shape {x.shape}, expected (T, {k_dim})")
    _need("out", out, np.float32, 2, (x.shape[0], n_rows))


def matmul_fp8(x: np.ndarray, w: np.ndarray, scales: np.ndarray, lut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (T, N) = x (T, K) @ dequant(w)^T.

    T == 1 runs gemv_fp8; more tokens run a fused kernel that decodes 16 weight rows at a time and
    multiplies them with every token. (Dequantizing tiles for BLAS measured slower on 2 cores: Numba's
    OpenMP workers spin while OpenBLAS's run, 7.8 s vs 2.0 s for a 128-token Hunyuan-0.5B prefill.)
    """
    bk = _check_fp8(w, scales, lut)
    _check_tokens(x, out, w.shape[1], w.shape[0])
    if x.shape[0] == 1:
        mode = _mode8(lut)
        _gemv_q(x[0], w, scales, lut, out[0], bk, mode, _POW2[mode])
    elif x.shape[0] > 1:
        _matmul_q(x, w, scales, lut, out, bk)
    return out


def matmul_f16(x: np.ndarray, w: np.ndarray, lut16: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (T, N) = x (T, K) @ decode(w)^T for raw half bits w u16 (N, K)."""
    _need("w", w, np.uint16, 2)
    _need("lut16", lut16, np.float32, 1, (65536,))
    _check_tokens(x, out, w.shape[1], w.shape[0])
    if x.shape[0] == 1:
        mode = _mode16(lut16)
        _gemv_q(x[0], w, _ONE, lut16, out[0], max(1, w.shape[1]), mode, _POW2[mode])
    elif x.shape[0] > 1:
        _matmul_q(x, w, _ONE, lut16, out, max(1, w.shape[1]))
    return out


@njit(cache=True, parallel=True, fastmath=_FM)
def _matmul_f32(x, w, out):
    # x: f32 (T, K), w: f32 (N, K), out: f32 (T, N); rows in parallel, two tokens per pass
    n_tok, k_dim = x.shape
    for n in prange(w.shape[0]):
        d = w[n]
        for t in range(0, n_tok - 1, 2):
            x0 = x[t]
            x1 = x[t + 1]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            for k in range(k_dim):
                a0 += d[k] * x0[k]
                a1 += d[k] * x1[k]
            out[t, n] = a0
            out[t + 1, n] = a1
        if n_tok % 2:
            xl = x[n_tok - 1]
            a = np.float32(0.0)
            for k in range(k_dim):
                a += d[k] * xl[k]
            out[n_tok - 1, n] = a


def gemv_f32(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (N,) = w (N, K) @ x (K,) for unquantized weights."""
    _need("w", w, np.float32, 2)
    _need("x", x, np.float32, 1, (w.shape[1],))
    _need("out", out, np.float32, 1, (w.shape[0],))
    _matmul_f32(x.reshape(1, -1), w, out.reshape(1, -1))
    return out


def matmul_f32(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (T, N) = x (T, K) @ w (N, K)^T for unquantized weights. A Numba kernel, not BLAS: OpenBLAS's
    threads and Numba's OpenMP workers fight over the cores (SmolLM2 fp32 decode, 2 threads: 1.5 tok/s
    through numpy's BLAS)."""
    _need("w", w, np.float32, 2)
    _check_tokens(x, out, w.shape[1], w.shape[0])
    _matmul_f32(x, w, out)
    return out


@njit(cache=True, parallel=True)
def _gather_f16(table, ids, lut16, out):
    # table: u16 (V, C), ids: i64 (T,), out: f32 (T, C)
    for t in prange(ids.shape[0]):
        row = table[ids[t]]
        for c in range(row.shape[0]):
            out[t, c] = lut16[row[c]]


def embedding_rows(table: np.ndarray, ids: np.ndarray, out: np.ndarray, lut16: np.ndarray | None = None) -> np.ndarray:
    """out[t] = table[ids[t]]; table f32 (V, C) or u16 half bits (V, C) decoded with lut16."""
    if not isinstance(table, np.ndarray) or table.ndim != 2 or table.dtype not in (np.float32, np.uint16):
        raise ValueError("table must be a 2-D float32 or uint16 (half bits) array")
    if not table.flags.c_contiguous:
        raise ValueError("table must be C-contiguous")
    _need("ids", ids, np.int64, 1)
    _need("out", out, np.float32, 2, (ids.shape[0], table.shape[1]))
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"ids must lie in [0, {table.shape[0]})")
    if table.dtype == np.float32:
        np.take(table, ids, axis=0, out=out)
    else:
        lut16 = fp16_lut() if lut16 is None else lut16
        _need("lut16", lut16, np.float32, 1, (65536,))
        _gather_f16(table, ids, lut16, out)
    return out
