"""Depthwise causal conv over time with carried state (LFM2-style short conv)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need

_EMPTY = np.zeros(0, dtype=np.float32)


@njit(cache=True, nogil=True, parallel=True)
def _dwconv(x, weight, state, out, bias):
    # x, out: f32 (T, C); weight: f32 (C, k); state: f32 (C, k-1) oldest first; bias: f32 (C,) or (0,)
    n_tok, c_dim = x.shape
    k = weight.shape[1]
    hist = k - 1
    for t in prange(n_tok):
        for c in range(c_dim):
            out[t, c] = bias[c] if bias.shape[0] else np.float32(0.0)
        for i in range(k):
            j = t + i  # row of xx = concat(state^T, x)
            if j < hist:
                for c in range(c_dim):
                    out[t, c] += weight[c, i] * state[c, j]
            else:
                xr = x[j - hist]
                for c in range(c_dim):
                    out[t, c] += weight[c, i] * xr[c]
    # new state = last k-1 rows of xx; ascending j only reads old state at T+j > j
    for c in range(c_dim):
        for j in range(hist):
            src = n_tok + j
            state[c, j] = state[c, src] if src < hist else x[src - hist, c]


def dwconv_causal(
    x: np.ndarray, weight: np.ndarray, state: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None
) -> np.ndarray:
    """y[t, c] = sum_i weight[c, i] * xx[t + i, c] (+ bias[c]), xx = concat(state^T, x) over time.

    x f32 (T, C), weight f32 (C, k), state f32 (C, k-1) updated in place to the last k-1 inputs,
    out f32 (T, C) (must not overlap x). Equals torch Conv1d(groups=C, padding=k-1)[..., :T].
    """
    _need("x", x, np.float32, 2)
    _need("weight", weight, np.float32, 2)
    n_tok, c_dim = x.shape
    if weight.shape[0] != c_dim or weight.shape[1] < 1:
        raise ValueError(f"weight has shape {weight.shape}, expected ({c_dim}, k)")
    _need("state", state, np.float32, 2, (c_dim, weight.shape[1] - 1))
    _need("out", out, np.float32, 2, x.shape)
    if np.may_share_memory(out, x) or np.may_share_memory(out, state):
        raise ValueError("out must not overlap x or state")
    if bias is None:
        bias = _EMPTY
    else:
        _need("bias", bias, np.float32, 1, (c_dim,))
    _dwconv(x, weight, state, out, bias)
    return out
