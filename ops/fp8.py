"""Emulated FP8 (E4M3 = float8_e4m3fn, E5M2 = float8_e5m2): encode, decode, block-scaled quantize.

Encoding is round-to-nearest-even (subnormals included) and saturating: |x| > max and ±inf map
to ±max, NaN maps to a NaN code. Decoding is a 256-entry float32 table.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

E4M3 = "e4m3"
E5M2 = "e5m2"
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}

# fmt -> (mantissa bits, exponent bias, largest finite code, NaN code); codes exclude the sign bit.
_PARAMS = {E4M3: (3, 7, 0x7E, 0x7F), E5M2: (2, 15, 0x7B, 0x7E)}


def _params(fmt: str) -> tuple[int, int, int, int]:
    try:
        return _PARAMS[fmt]
    except KeyError:
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}") from None


@njit(cache=True, inline="always")
def _encode_one(x, mbits, bias, max_code, nan_code, max_val, min_normal, inv_quantum):
    # x: float32 scalar -> uint8 code.
    sign = np.int64((np.float32(x).view(np.uint32) >> 24) & 0x80)
    if x != x:
        # NaN keeps its sign bit, as ml_dtypes does.
        return np.uint8(sign | nan_code)
    a = abs(np.float64(x))
    if a >= max_val:
        return np.uint8(sign | max_code)
    if a < min_normal:
        # subnormal grid is uniform: code = rne(a / quantum); a code of 2**mbits is the
        # smallest normal, which is also its encoding.
        return np.uint8(sign | np.int64(np.rint(a * inv_quantum)))
    # normal: round the float32 mantissa to mbits with RNE on the raw bits, then rebias.
    bits = np.int64(np.float32(a).view(np.uint32))
    shift = 23 - mbits
    r = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) >> shift
    code = r - ((127 - bias) << mbits)
    if code > max_code:
        code = max_code
    return np.uint8(sign | code)


@njit(cache=True, inline="always")
def e4m3_code(v):
    """The E4M3 code of float32 v as int8 (sign, 4 exponent, 3 mantissa bits), rounded to nearest even
    and saturating at ±448, as `_encode_one` for every finite v, without branches, so that a loop
    over a row vectorises (the FP8 KV cache, hy_edge_ops.kvrow). NaN gives ±448: a caller that must
    keep NaN does so through its scale."""
    bits = np.float32(v).view(np.uint32)
    a = np.int64(bits & 0x7FFFFFFF)
    normal = min(((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3), 0x7E)  # RNE to 3 bits, rebias 127 -> 7
    subnormal = np.int64(np.rint(abs(np.float32(v)) * np.float32(512.0)))  # below 2**-6: multiples of 2**-9
    code = subnormal if a < 0x3C800000 else normal
    return np.int8(np.int64((bits >> 24) & 0x80) | code)


@njit(cache=True, nogil=True, parallel=True)
def _encode_flat(x, out, mbits, bias, max_code, nan_code, max_val, min_normal, inv_quantum):
    # x: f32 (M,), out: u8 (M,); chunks keep the parallel loop coarse.
    n = x.shape[0]
    chunk = 1 << 16
    nchunks = (n + chunk - 1) // chunk
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(n, lo + chunk)
        for i in range(lo, hi):
            out[i] = _encode_one(x[i], mbits, bias, max_code, nan_code, max_val, min_normal, inv_quantum)


@njit(cache=True, parallel=True)
def _quantize_rows(w, scales, out, bk, mbits, bias, max_code, nan_code, max_val, min_normal, inv_quantum):
    # w: f32 (N, K), scales: f32 (N, G), out: u8 (N, K); column k uses scales[n, k // bk].
    n_rows, k_dim = w.shape
    for n in prange(n_rows):
        for k0 in range(0, k_dim, bk):
            s = scales[n, k0 // bk]
            k1 = min(k_dim, k0 + bk)
            if s == 0.0:
                # an all-zero block gets scale 0 from amax/max; its codes are 0, not NaN.
                for k in range(k0, k1):
                    out[n, k] = 0
            else:
                for k in range(k0, k1):
                    v = np.float32(w[n, k] / s)
                    out[n, k] = _encode_one(v, mbits, bias, max_code, nan_code, max_val, min_normal, inv_quantum)


def _encode_args(fmt: str) -> tuple:
    mbits, bias, max_code, nan_code = _params(fmt)
    min_normal = 2.0 ** (1 - bias)
    inv_quantum = 2.0 ** (bias - 1 + mbits)
    return mbits, bias, max_code, nan_code, FP8_MAX[fmt], min_normal, inv_quantum


def encode_fp8(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 array (any shape) -> uint8 FP8 codes of the same shape."""
    args = _encode_args(fmt)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.uint8)
    _encode_flat(flat, out, *args)
    return out.reshape(x.shape)


@functools.cache
def _lut(fmt: str) -> np.ndarray:
    mbits, bias, _, _ = _params(fmt)
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> mbits) & ((1 << (7 - mbits)) - 1)
    m = codes & ((1 << mbits) - 1)
    frac = m / float(1 << mbits)
    val = np.where(e == 0, frac * 2.0 ** (1 - bias), (1.0 + frac) * 2.0 ** (e - bias))
    val = sign * val
    low = codes & 0x7F
    if fmt == E4M3:
        val[low == 0x7F] = np.nan
    else:
        e_max = (1 << (7 - mbits)) - 1
        val[(e == e_max) & (m == 0)] = sign[(e == e_max) & (m == 0)] * np.inf
        val[(e == e_max) & (m != 0)] = np.nan
    lut = val.astype(np.float32)
    lut.flags.writeable = False
    return lut


def fp8_lut(fmt: str) -> np.ndarray:
    """Decode table: f32 (256,), read-only and cached per format."""
    _params(fmt)
    return _lut(fmt)


def decode_fp8(codes: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 codes (any shape) -> float32 values."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    return fp8_lut(fmt)[codes]


def _check_scales(scales: np.ndarray, n_rows: int, k_dim: int) -> int:
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.ndim != 2:
        raise ValueError("scales must be a float32 array of shape (N, G)")
    if scales.shape[0] != n_rows or not 1 <= scales.shape[1] <= max(k_dim, 1):
        raise ValueError(f"scales has shape {scales.shape}, expected ({n_rows}, G) with 1 <= G <= {k_dim}")
    if not scales.flags.c_contiguous:
        raise ValueError("scales must be C-contiguous")
    return block_size(k_dim, scales.shape[1])


def block_size(k_dim: int, groups: int) -> int:
    """Columns per scale block: Bk = ceil(K / G)."""
    return max(1, -(-k_dim // groups))


def quantize_fp8(w: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """codes[n, k] = encode(w[n, k] / scales[n, k // Bk]); w f32 (N, K), scales f32 (N, G) -> u8 (N, K).

    A zero scale yields zero codes for its block (all-zero rows quantize to zeros).
    """
    args = _encode_args(fmt)
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2:
        raise ValueError("w must be a float32 array of shape (N, K)")
    bk = _check_scales(scales, w.shape[0], w.shape[1])
    w = np.ascontiguousarray(w)
    out = np.empty(w.shape, dtype=np.uint8)
    _quantize_rows(w, scales, out, bk, *args)
    return out


_TILE = 16  # rows rounded together: each row of u is read once per tile, from L1


@njit(cache=True, parallel=True)
def _quantize_compensated(
    w, scales, u, order, out, lut, bk, mbits, bias, max_code, nan_code, max_val, min_normal, inv_q
):
    # w f32 (N, K); scales f32 (N, G); u f32 (K, K) upper, in processing order; order i64 (K,): the column
    # rounded at step j; out u8 (N, K). Rows are independent: each tile of rows is one parallel task.
    n_rows, k_dim = w.shape
    for t in prange((n_rows + _TILE - 1) // _TILE):
        r0 = t * _TILE
        m = min(n_rows, r0 + _TILE) - r0
        buf = np.empty((m, k_dim), np.float32)  # the tile's rows in processing order, updated in place
        for i in range(m):
            for j in range(k_dim):
                buf[i, j] = w[r0 + i, order[j]]
        for j in range(k_dim):
            col = order[j]
            d = u[j, j]
            later = u[j, j + 1 :]  # 1-D views: the update loop below vectorises (2-D indexing does not, 8x)
            for i in range(m):
                s = scales[r0 + i, col // bk]
                v = buf[i, j]
                code = np.uint8(0)
                q = np.float32(0.0)
                if s != 0.0:
                    code = _encode_one(np.float32(v / s), mbits, bias, max_code, nan_code, max_val, min_normal, inv_q)
                    q = lut[code] * s
                out[r0 + i, col] = code
                e = np.float32((v - q) / d)
                rest = buf[i, j + 1 :]
                for k in range(rest.shape[0]):
                    rest[k] -= e * later[k]


def quantize_fp8_compensated(w: np.ndarray, scales: np.ndarray, u: np.ndarray, order: np.ndarray, fmt: str):
    """Codes u8 (N, K) of w f32 (N, K) with scales f32 (N, G) as `quantize_fp8`, rounded one column at a
    time in `order` (i64 (K,), a permutation): the error of the column rounded at step j, divided by
    u[j, j], is subtracted from each later column k (in order) times u[j, k] (GPTQ's update; u f32 (K, K)
    upper triangular, rows and columns in processing order). With u diagonal this is `quantize_fp8`."""
    args = _encode_args(fmt)
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2:
        raise ValueError("w must be a float32 array of shape (N, K)")
    K = w.shape[1]
    bk = _check_scales(scales, w.shape[0], K)
    if not isinstance(u, np.ndarray) or u.dtype != np.float32 or u.shape != (K, K) or not u.flags.c_contiguous:
        raise ValueError(f"u must be a C-contiguous float32 array of shape ({K}, {K})")
    order = np.asarray(order)
    if order.dtype != np.int64 or order.shape != (K,) or not np.array_equal(np.sort(order), np.arange(K)):
        raise ValueError(f"order must be an int64 permutation of 0..{K - 1}")
    out = np.empty(w.shape, dtype=np.uint8)
    _quantize_compensated(np.ascontiguousarray(w), scales, u, order, out, fp8_lut(fmt), bk, *args)
    return out


def dequantize_fp8(codes: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """codes u8 (N, K), scales f32 (N, G) -> f32 (N, K) = lut[codes] * scales[n, k // Bk]."""
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError("codes must be a uint8 array of shape (N, K)")
    bk = _check_scales(scales, codes.shape[0], codes.shape[1])
    col_scale = np.repeat(scales, bk, axis=1)[:, : codes.shape[1]]
    return fp8_lut(fmt)[codes] * col_scale


@njit(cache=True, parallel=True)
def _count_nan_codes(codes, low_min):
    # codes: u8 (M,); NaN codes are those whose low 7 bits are >= low_min (E4M3 0x7F; E5M2 0x7D..0x7F,
    # and 0x7C, infinity, which no finite weight encodes either)
    n = codes.shape[0]
    chunk = 1 << 20
    total = 0
    for c in prange((n + chunk - 1) // chunk):
        bad = 0
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            bad += (codes[i] & 0x7F) >= low_min
        total += bad
    return total


def has_nan_codes(codes: np.ndarray, fmt: str) -> bool:
    """True if uint8 FP8 codes of `fmt` hold a NaN (or, for E5M2, an infinity) code. The fused kernels
    decode without NaN handling (ops/linear.py), so such weights are refused at load."""
    _params(fmt)
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        raise ValueError("codes must be a uint8 array")
    flat = np.ascontiguousarray(codes).reshape(-1)
    return bool(_count_nan_codes(flat, 0x7F if fmt == E4M3 else 0x7C))
