"""Gated-MLP activations: SwiGLU (silu(gate) * up), the ReLU6 gate, and GeGLU with tanh GELU (Gemma)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .checks import need_array as _need
from .expf import expf

_CHUNK = 4096
KINDS = {"silu": 0, "relu6": 1, "gelu_tanh": 2}  # ModelSpec.hidden_act -> the kernels' `kind`
# gelu_tanh(x) = x * sigmoid(GELU_C (x + GELU_CUBIC x^3)) = 0.5 x (1 + tanh(GELU_C / 2 (x + GELU_CUBIC x^3))): the
# kernels', the converter's graph's and its calibration's (torch's gelu(approximate="tanh"))
GELU_C = np.float32(2.0 * np.sqrt(2.0 / np.pi))
GELU_CUBIC = np.float32(0.044715)


@njit(cache=True, inline="always")
def _glu_range(gate, up, out, kind, lo, hi):
    # gate, up, out: f32 (M,) flat (may alias); kind 0 = silu, 1 = relu6, 2 = gelu_tanh; elements lo..hi-1. Zero-based
    # loops over slices, one per kind, and the callers' numpy error model (no zero-division check on
    # the silu divide) let the loop vectorise
    g, u, o = gate[lo:hi], up[lo:hi], out[lo:hi]
    if kind == 0:
        for i in range(hi - lo):
            x = g[i]
            o[i] = x / (np.float32(1.0) + expf(-x)) * u[i]
    elif kind == 1:
        for i in range(hi - lo):
            o[i] = min(max(g[i], np.float32(0.0)), np.float32(6.0)) * u[i]
    else:  # 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)): torch's gelu(approximate="tanh")
        for i in range(hi - lo):
            x = g[i]
            z = GELU_C * (x + GELU_CUBIC * x * x * x)
            o[i] = x / (np.float32(1.0) + expf(-z)) * u[i]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _glu(gate, up, out, kind):
    m = gate.shape[0]
    for c in prange((m + _CHUNK - 1) // _CHUNK):
        _glu_range(gate, up, out, kind, c * _CHUNK, min(m, (c + 1) * _CHUNK))


@njit(cache=True, nogil=True, error_model="numpy")
def glu_serial(gate, up, out, kind):
    # on the calling thread: a decode step's few thousand values are done before a parallel region
    # would start
    _glu_range(gate, up, out, kind, 0, gate.shape[0])


def _run(gate, up, out, kind: int) -> np.ndarray:
    _need("gate", gate, np.float32, gate.ndim if isinstance(gate, np.ndarray) else 2)
    _need("up", up, np.float32, gate.ndim, gate.shape)
    _need("out", out, np.float32, gate.ndim, gate.shape)
    glu(gate, up, out, kind)
    return out


def glu(gate: np.ndarray, up: np.ndarray, out: np.ndarray, kind: int) -> None:
    """Unchecked: kind 0 = SwiGLU, 1 = ReLU6 gate, 2 = GeGLU (tanh GELU); contiguous f32 arrays of one shape."""
    g, u, o = gate.reshape(-1), up.reshape(-1), out.reshape(-1)
    if g.shape[0] <= _CHUNK:
        glu_serial(g, u, o, kind)
    else:
        _glu(g, u, o, kind)


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = silu(gate) * up, silu(x) = x / (1 + exp(-x)) in float32; any matching contiguous shape."""
    return _run(gate, up, out, 0)


def relu6_glu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = min(max(gate, 0), 6) * up."""
    return _run(gate, up, out, 1)


def gelu_tanh_glu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = gelu_tanh(gate) * up, transformers' gelu_pytorch_tanh, in float32."""
    return _run(gate, up, out, 2)
