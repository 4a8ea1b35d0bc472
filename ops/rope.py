"""Rotary position embedding, NeoX rotate-half convention (transformers' rotate_half)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .checks import need_array as _need


def rope_inv_freq(
    head_dim: int,
    base: float,
    llama3: tuple[float, float, float, int] | None = None,
    factors: tuple[float, ...] | None = None,
    linear: float = 1.0,
) -> np.ndarray:
    """f32 (D/2,) = 1 / base ** (arange(0, D, 2) / D), computed in float64 and rounded to float32 once.

    The one table the converter writes into the file and the numba engine computes at load. float32
    `np.power` differs in the last bit between CPUs (AVX-512 x86 vs glibc on ARM, issue 11); float64
    pow errs far below a float32 ulp, so rounding it once gives the same table on every machine.
    transformers computes it in float32: the two agree to an ulp.

    `llama3`: Llama 3.1's scaling (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), as transformers' `_compute_llama3_parameters`: frequencies whose
    wavelength exceeds original / low_freq_factor are divided by factor, those shorter than original /
    high_freq_factor kept, and the ones between blended linearly in original / wavelength.

    `factors`: a divisor per frequency (D/2,), as a GGUF's `rope_freqs` tensor carries Llama 3's scaling
    (llama.cpp divides each frequency by its factor).

    `linear`: linear scaling (transformers' "linear" rope type: positions divided by it), every frequency
    divided by it."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if not base > 0:
        raise ValueError(f"base must be positive, got {base}")
    inv = np.array([1.0 / math.pow(float(base), i / head_dim) for i in range(0, head_dim, 2)], np.float64)
    if llama3 is not None:
        factor, low, high, original = llama3
        if not (factor > 0 and 0 < low < high and original > 0):
            raise ValueError(f"llama3 RoPE scaling needs factor > 0 and 0 < low < high factors, got {llama3}")
        wavelen = 2 * math.pi / inv
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > original / low, inv / factor, np.where(wavelen < original / high, inv, blended))
    if factors is not None:
        f = np.asarray(factors, np.float64)
        if f.shape != inv.shape or not (np.isfinite(f).all() and (f > 0).all()):
            raise ValueError(f"RoPE frequency factors must be {inv.shape[0]} positive numbers")
        inv = inv / f
    if not (math.isfinite(linear) and linear > 0):
        raise ValueError(f"linear RoPE scaling needs a positive factor, got {linear}")
    return (inv / linear).astype(np.float32)


def rope_tables(inv_freq: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin f32 (P, D/2) of float32(position) * inv_freq (product rounded to float32)."""
    _need("inv_freq", inv_freq, np.float32, 1)
    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # (P, D/2) f32
    angles = freqs.astype(np.float64)  # correctly rounded cos/sin of the float32 angle
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@njit(cache=True, nogil=True, parallel=True)
def _apply_rope(x, positions, cos, sin):
    # x: f32 (T, H, D) in place, positions: i64 (T,), cos/sin: f32 (P, D/2)
    n_tok, n_heads, d = x.shape
    half = d // 2
    for t in prange(n_tok):
        cs = cos[positions[t]]
        sn = sin[positions[t]]
        for h in range(n_heads):
            for i in range(half):
                x1 = x[t, h, i]
                x2 = x[t, h, i + half]
                x[t, h, i] = x1 * cs[i] - x2 * sn[i]
                x[t, h, i + half] = x2 * cs[i] + x1 * sn[i]


def apply_rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x f32 (T, H, D) in place at positions i64 (T,) using tables from rope_tables."""
    _need("x", x, np.float32, 3)
    _need("positions", positions, np.int64, 1, (x.shape[0],))
    _need("cos", cos, np.float32, 2)
    _need("sin", sin, np.float32, 2, cos.shape)
    if cos.shape[1] * 2 != x.shape[2]:
        raise ValueError(f"cos has shape {cos.shape}, expected (P, {x.shape[2] // 2})")
    if positions.size and (positions.min() < 0 or positions.max() >= cos.shape[0]):
        raise ValueError(f"positions must lie in [0, {cos.shape[0]})")
    _apply_rope(x, positions, cos, sin)
    return x
