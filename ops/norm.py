"""RMSNorm as in transformers' HunYuanDenseV1RMSNorm / LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps))."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need


@njit(cache=True, parallel=True)
def _rms_norm(x, weight, eps, out):
    # x, out: f32 (T, C) (may alias), weight: f32 (C,)
    n_rows, c_dim = x.shape
    for t in prange(n_rows):
        ss = 0.0  # float64 accumulation: closer to the exact mean than torch's float32 sum
        for c in range(c_dim):
            v = np.float64(x[t, c])
            ss += v * v
        var = np.float32(ss / c_dim)
        inv = np.float32(1.0) / np.sqrt(var + np.float32(eps))
        for c in range(c_dim):
            out[t, c] = weight[c] * (x[t, c] * inv)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """x f32 (T, C), weight f32 (C,) -> out f32 (T, C); out may be x. Per-head norm: pass (T*H, D) views."""
    _need("x", x, np.float32, 2)
    _need("weight", weight, np.float32, 1, (x.shape[1],))
    _need("out", out, np.float32, 2, x.shape)
    _rms_norm(x, weight, float(eps), out)
    return out
