"""Reference FP8 KV cache rows for the tests, built with ml_dtypes (not with the runtime's encoder)."""

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn


def ml_codes(x):
    """E4M3 codes (int8) of float32 x: saturating at ±448, round to nearest even."""
    return np.clip(x, -448, 448).astype(E4M3).view(np.int8)


def fp8_rows(x):
    """FP8 rows of x (..., D) as hy_edge_ops.kvrow lays them out: E4M3 codes of x / scale, scale = amax *
    (1/448) in float32 (1 for a zero row), then the scale's 4 bytes little-endian; and the values the
    rows stand for (float32)."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s = (amax * np.float32(1 / 448)).astype(np.float32)
    s[s == 0] = 1
    codes = ml_codes(x / s)
    rows = np.concatenate([codes, s.astype("<f4").view(np.int8)], axis=-1)
    return rows, codes.view(E4M3).astype(np.float32) * s
