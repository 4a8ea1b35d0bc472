"""RMSNorm as in transformers' HunYuanDenseV1RMSNorm / LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps))."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need


@njit(cache=True, nogil=True, parallel=True)
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


@njit(cache=True, nogil=True)
def _add_rms_norm(x, y, weight, eps, out):
    # x += y (skipped when y is empty), then out = rms_norm(x); x, y, out: f32 (T, C); serial: the
    # engine calls this once per block with a few rows, where a parallel region costs more than it saves
    n_rows, c_dim = x.shape
    add = y.shape[0] > 0
    for t in range(n_rows):
        xr = x[t]
        if add:
            yr = y[t]
            for c in range(c_dim):
                xr[c] += yr[c]
        ss = 0.0
        for c in range(c_dim):
            v = np.float64(xr[c])
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(np.float32(ss / c_dim) + np.float32(eps))
        o = out[t]
        for c in range(c_dim):
            o[c] = weight[c] * (xr[c] * inv)


def add_rms_norm(x: np.ndarray, y: np.ndarray | None, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """The residual step of a pre-norm block: x += y (in place; skipped when y is None), then
    out = rms_norm(x, weight). x, y, out f32 (T, C) (out must not be x); weight f32 (C,)."""
    _need("x", x, np.float32, 2)
    if y is None:
        y = np.zeros((0, x.shape[1]), np.float32)
    else:
        _need("y", y, np.float32, 2, x.shape)
    _need("weight", weight, np.float32, 1, (x.shape[1],))
    _need("out", out, np.float32, 2, x.shape)
    _add_rms_norm(x, y, weight, float(eps), out)
    return out
