"""Sub-byte FP weights: FP4 E2M1 and FP6 E3M2 / E2M3 (OCP microscaling element formats) with a half scale
per block of 32 — the encoder, GPTQ's column loop and the packed layout the kernels read (hy_edge_ops.blockq).

A code is sign, exponent, mantissa from its top bit down (ml_dtypes' float4_e2m1fn, float6_e3m2fn,
float6_e2m3fn): exponent 0 holds the subnormals, there is no infinity or NaN, so every code is a finite value
(E2M1: 0, .5, 1, 1.5, 2, 3, 4, 6; E3M2: up to 28; E2M3: up to 7.5). A weight is value(code) * d, d the
block's scale as an IEEE half. Encoding rounds to the nearest value, ties to the even code (the one whose
mantissa ends in 0, as round-to-nearest-even does), and saturates at the largest value.

Packed layout of one block of 32 codes c_0 .. c_31:
- e2m1: 16 bytes, byte j = c_j | c_{j+16} << 4 (GGUF's Q4 nibble order);
- e3m2 / e2m3: 24 bytes: bytes 0..15 hold the low 4 bits in that same order, bytes 16..23 the high 2 bits:
  byte 16 + j = hi(c_j) | hi(c_{j+8}) << 2 | hi(c_{j+16}) << 4 | hi(c_{j+24}) << 6, hi(c) = c >> 4.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

BLOCK = 32
FORMATS = {"e2m1": (2, 1), "e3m2": (3, 2), "e2m3": (2, 3)}  # (exponent bits, mantissa bits)
BITS = {f: 1 + e + m for f, (e, m) in FORMATS.items()}
BLOCK_BYTES = {f: BLOCK * b // 8 for f, b in BITS.items()}  # packed bytes of one block's codes
HALF_BYTES = 2  # the block's scale


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")


@functools.cache
def _values(fmt: str) -> np.ndarray:
    e_bits, m_bits = FORMATS[fmt]
    bias = (1 << (e_bits - 1)) - 1
    codes = np.arange(1 << BITS[fmt])
    mag = codes & ((1 << (e_bits + m_bits)) - 1)
    e, m = mag >> m_bits, (mag & ((1 << m_bits) - 1)) / float(1 << m_bits)
    val = np.where(e == 0, m * 2.0 ** (1 - bias), (1.0 + m) * 2.0 ** (e - bias))
    out = np.where(codes >> (e_bits + m_bits), -val, val).astype(np.float32)
    out.flags.writeable = False
    return out


def values(fmt: str) -> np.ndarray:
    """f32 (2**bits,): the value of every code (read-only)."""
    _check(fmt)
    return _values(fmt)


def max_value(fmt: str) -> float:
    _check(fmt)
    return float(_values(fmt).max())


@functools.cache
def _midpoints(fmt: str) -> np.ndarray:
    mags = _values(fmt)[: 1 << (BITS[fmt] - 1)].astype(np.float64)  # the non-negative codes, ascending
    return ((mags[1:] + mags[:-1]) / 2).astype(np.float32)  # exact: neighbours differ by a power of two


@njit(cache=True, inline="always")
def _code(v, mids, sign_bit):
    # the nearest code to float32 v: how many midpoints lie below |v|, a tie going to the even code
    a = abs(v)
    c = 0
    for i in range(mids.shape[0]):
        c += a > mids[i]
    if c < mids.shape[0] and a == mids[c] and c & 1:
        c += 1
    return np.uint8(c | (sign_bit if v < 0 else 0))


@njit(cache=True, parallel=True)
def _quantize(w, d, mids, sign_bit, out):
    # w f32 (N, K), d f32 (N, K / 32), out u8 (N, K) one code a byte
    n_rows, k_dim = w.shape
    for n in prange(n_rows):
        for g in range(k_dim // 32):
            s = d[n, g]
            for k in range(32 * g, 32 * g + 32):
                out[n, k] = _code(np.float32(w[n, k] / s), mids, sign_bit) if s != 0 else 0


def _check_args(w: np.ndarray, d: np.ndarray) -> None:
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"w must be a float32 array (N, K) with K a multiple of {BLOCK}")
    if not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.shape != (w.shape[0], w.shape[1] // BLOCK):
        raise ValueError(f"d must be a float32 array of shape {(w.shape[0], w.shape[1] // BLOCK)}")


def quantize(w: np.ndarray, d: np.ndarray, fmt: str) -> np.ndarray:
    """Codes u8 (N, K), one a byte, of w f32 (N, K) over the block scales d f32 (N, K / 32): the code
    nearest w / d (a zero scale gives zero codes)."""
    _check(fmt)
    _check_args(w, d)
    out = np.empty(w.shape, np.uint8)
    _quantize(np.ascontiguousarray(w), np.ascontiguousarray(d), _midpoints(fmt), 1 << (BITS[fmt] - 1), out)
    return out


def dequantize(codes: np.ndarray, d: np.ndarray, fmt: str) -> np.ndarray:
    """f32 (N, K) = value(codes) * d per block of 32 (codes one a byte, as `quantize` gives them)."""
    _check(fmt)
    N, K = codes.shape
    return (_values(fmt)[codes].reshape(N, K // BLOCK, BLOCK) * d[:, :, None]).reshape(N, K)


_TILE = 16  # rows rounded together (as hy_edge_ops.fp8's compensated loop)


@njit(cache=True, parallel=True)
def _compensated(w, d, u, order, out, lut, mids, sign_bit):
    # GPTQ's loop (hy_edge_ops.fp8._quantize_compensated) onto this grid: the error of the column rounded at
    # step j, divided by u[j, j], is taken from each later column k times u[j, k]
    n_rows, k_dim = w.shape
    for t in prange((n_rows + _TILE - 1) // _TILE):
        r0 = t * _TILE
        m = min(n_rows, r0 + _TILE) - r0
        buf = np.empty((m, k_dim), np.float32)
        for i in range(m):
            for j in range(k_dim):
                buf[i, j] = w[r0 + i, order[j]]
        for j in range(k_dim):
            col = order[j]
            later = u[j, j + 1 :]
            for i in range(m):
                s = d[r0 + i, col // 32]
                v = buf[i, j]
                code = np.uint8(0)
                q = np.float32(0.0)
                if s != 0.0:
                    code = _code(np.float32(v / s), mids, sign_bit)
                    q = lut[code] * s
                out[r0 + i, col] = code
                e = np.float32((v - q) / u[j, j])
                rest = buf[i, j + 1 :]
                for k in range(rest.shape[0]):
                    rest[k] -= e * later[k]


def quantize_compensated(w: np.ndarray, d: np.ndarray, u: np.ndarray, order: np.ndarray, fmt: str) -> np.ndarray:
    """Codes as `quantize`, rounded one column at a time in `order` with each column's error spread onto the
    later ones (u f32 (K, K) upper, rows and columns in processing order: hy_edge_convert.gptq)."""
    _check(fmt)
    _check_args(w, d)
    K = w.shape[1]
    if not isinstance(u, np.ndarray) or u.dtype != np.float32 or u.shape != (K, K) or not u.flags.c_contiguous:
        raise ValueError(f"u must be a C-contiguous float32 array of shape ({K}, {K})")
    order = np.asarray(order)
    if order.dtype != np.int64 or order.shape != (K,) or not np.array_equal(np.sort(order), np.arange(K)):
        raise ValueError(f"order must be an int64 permutation of 0..{K - 1}")
    out = np.empty(w.shape, np.uint8)
    args = (_values(fmt), _midpoints(fmt), 1 << (BITS[fmt] - 1))
    _compensated(np.ascontiguousarray(w), np.ascontiguousarray(d), u, order, out, *args)
    return out


def pack(codes: np.ndarray, fmt: str) -> np.ndarray:
    """u8 (N, K / 32 * BLOCK_BYTES[fmt]): codes u8 (N, K), one a byte, in the layout above."""
    _check(fmt)
    N, K = codes.shape
    c = codes.reshape(N, K // BLOCK, BLOCK)
    low = c & 15
    nibbles = low[:, :, :16] | (low[:, :, 16:] << 4)
    if fmt == "e2m1":
        return np.ascontiguousarray(nibbles.reshape(N, -1))
    hi = c >> 4
    tops = hi[:, :, 0:8] | (hi[:, :, 8:16] << 2) | (hi[:, :, 16:24] << 4) | (hi[:, :, 24:32] << 6)
    return np.ascontiguousarray(np.concatenate([nibbles, tops], axis=2).reshape(N, -1))


def unpack(packed: np.ndarray, fmt: str) -> np.ndarray:
    """codes u8 (N, K), one a byte, from `pack`'s layout."""
    _check(fmt)
    N = packed.shape[0]
    b = packed.reshape(N, -1, BLOCK_BYTES[fmt])
    low = np.concatenate([b[:, :, :16] & 15, b[:, :, :16] >> 4], axis=2)
    if fmt == "e2m1":
        return np.ascontiguousarray(low.reshape(N, -1))
    t = b[:, :, 16:24]
    hi = np.concatenate([t & 3, (t >> 2) & 3, (t >> 4) & 3, t >> 6], axis=2)
    return np.ascontiguousarray((low | (hi << 4)).reshape(N, -1))
