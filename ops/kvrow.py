"""One row of a KV cache (one position of one kv head) as the attention kernels write and read it.

The cache's dtype selects the storage, at compile time:
- float32: the values as they are;
- uint16: half bits, rounded to nearest even;
- int8: FP8 E4M3 codes of value / scale, rounded to nearest even as the converter's `quantize_fp8`,
  then the row's float32 scale = amax(|row|) / 448 (1 for a row of zeros) in its last SCALE_BYTES
  bytes, little-endian: D + 4 bytes a row (132 at D = 128, against 512 in float32), the scale beside
  its codes as llama.cpp keeps a block's. A row holding inf or NaN gets a NaN scale, so that it reads
  back non-finite, as it would from a float32 cache.

`store(dst, src)` writes a row (dst: the cache row, src: D float32 values). `factor(row, d)` is what a
sum over a row's decoded elements (hy_edge_ops.half.as_f32) is multiplied by, after `acc_scale`: the
row's scale times the E4M3 fold (hy_edge_ops.half.FP8_FOLD) for int8 rows, 1 otherwise, so the float32
and half caches compute exactly what they computed before scales existed.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .fp8 import E4M3, FP8_MAX, e4m3_code
from .half import FP8_FOLD, bits_to_f32, put

SCALE_BYTES = 4
# stored dtype of each KV cache type and the bytes a row holds past its D elements
STORAGE = {"fp32": np.float32, "fp16": np.uint16, "fp8": np.int8}
EXTRA = {"fp32": 0, "fp16": 0, "fp8": SCALE_BYTES}
_INV_MAX = np.float32(1.0 / FP8_MAX[E4M3])  # as the converter's scales: amax * (1 / 448) in float32
_FOLD = np.float32(FP8_FOLD[E4M3])


def row_length(kv_cache: str, head_dim: int) -> int:
    """Elements of the cache's dtype per row."""
    return head_dim + EXTRA[kv_cache] // np.dtype(STORAGE[kv_cache]).itemsize


def store(dst, src):
    """dst (a cache row) = src (float32, D) in the cache's storage."""


@overload(store)  # compiled as its own function: its loops, inlined, upset numba's SSA checks
def _store_impl(dst, src):
    if not isinstance(dst, types.Array):
        return None
    if dst.dtype == types.int8:

        def e4m3(dst, src):
            n = src.shape[0]
            amax = np.float32(0.0)
            poison = np.float32(0.0)  # NaN if the row holds inf or NaN (x * 0)
            for i in range(n):
                amax = max(amax, abs(src[i]))
                poison += src[i] * np.float32(0.0)
            raw = np.float32(amax * _INV_MAX) + poison
            s = raw if raw != 0.0 else np.float32(1.0)
            for i in range(n):
                dst[i] = e4m3_code(np.float32(src[i] / s))
            bits = np.int64(np.float32(s).view(np.uint32))
            dst[n] = np.int8(bits & 0xFF)
            dst[n + 1] = np.int8((bits >> 8) & 0xFF)
            dst[n + 2] = np.int8((bits >> 16) & 0xFF)
            dst[n + 3] = np.int8((bits >> 24) & 0xFF)

        return e4m3

    def element_wise(dst, src):  # float32 as is, half bits rounded to nearest (hy_edge_ops.half.put)
        for i in range(src.shape[0]):
            put(dst, i, src[i])

    return element_wise


def factor(row, d):
    """The multiplier of a sum over row[:d]'s decoded elements (after acc_scale): scale x fold, or 1."""


@overload(factor, inline="always")
def _factor_impl(row, d):
    if not isinstance(row, types.Array):
        return None
    if row.dtype == types.int8:

        def e4m3(row, d):
            b0, b1 = np.int64(row[d]) & 0xFF, np.int64(row[d + 1]) & 0xFF
            b2, b3 = np.int64(row[d + 2]) & 0xFF, np.int64(row[d + 3]) & 0xFF
            return bits_to_f32(b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)) * _FOLD

        return e4m3
    return lambda row, d: np.float32(1.0)
