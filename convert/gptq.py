"""Error-compensating rounding onto the FP8 (or sub-byte FP) grid (GPTQ) and the scale search that feeds it.

Round-to-nearest minimises each weight's own error, but what the model sees is a linear's output X W^T. With
H = X^T X, the second moment of the inputs that reach the linear, the output error of a weight error E is
tr(E H E^T). GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022; the reference implementation's `fasterquant`) rounds W one input column at a time and
moves each column's rounding error onto the columns not yet rounded, along the rows of the upper Cholesky
factor of H^-1, so that the remaining columns make up for it as far as the inputs' correlations allow.

Every column is rounded by `quantize_fp8`'s encoder (round to nearest even onto the E4M3 / E5M2 grid,
saturating; the column loop is `hy_edge_ops.fp8.quantize_fp8_compensated`) with scales fixed before the first
column, so the codes are valid FP8 codes in the same scale layout (per tensor, per channel, or block:N) as
round-to-nearest's; sub-byte formats (hy_edge_ops.minifloat) likewise, with their half scale per block of 32.
With H = I GPTQ is round-to-nearest exactly: no column's error has anywhere to go.
"""

from __future__ import annotations

import functools

import numpy as np
from hy_edge_ops import minifloat
from hy_edge_ops.fp8 import dequantize_fp8, quantize_fp8, quantize_fp8_compensated

DAMP = 0.01  # of mean(diag H), added to the diagonal: the reference implementation's percdamp
# candidate scales as multiples of amax / FP8_MAX: 1.0 is among them, so the search never does worse than amax
# on the error it minimises; below 1 the largest values clip, above 1 the grid shifts off the top code
SCALE_GRID = tuple(1.0 + i / 32 for i in range(-8, 3))
ROWS_PER_CHUNK = 4096  # bounds the search's fp32 temporaries (4096 x K floats per candidate)


def search_scales(
    w: np.ndarray,
    scales: np.ndarray,
    fmt: str,
    importance: np.ndarray | None = None,
    roundtrip=None,
    grid: tuple[float, ...] = SCALE_GRID,
) -> np.ndarray:
    """Scales (N, G) that minimise sum_k importance[k] * (dequant(quant(w))[n, k] - w[n, k])^2 per row and
    block, among the amax scales `scales` (N, G) times each factor of `grid`.

    w f32 (N, K); importance f32 (K,) (diag of H: how strongly each input reaches the output), or None for
    plain squared error; `roundtrip(w_rows, scales_rows)`: dequant(quant(w_rows)) (default: FP8 `fmt`)."""
    if roundtrip is None:
        roundtrip = functools.partial(_fp8_roundtrip, fmt=fmt)
    N, K = w.shape
    G = scales.shape[1]
    imp = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32)
    best = scales.copy()
    for r0 in range(0, N, ROWS_PER_CHUNK):
        rows = slice(r0, r0 + ROWS_PER_CHUNK)
        chunk, base = np.ascontiguousarray(w[rows]), scales[rows]
        best_err = np.full(base.shape, np.inf, np.float64)
        for s in grid:
            cand = np.ascontiguousarray(base * np.float32(s))
            deq = roundtrip(chunk, cand)
            err = (np.square(deq - chunk) * imp).reshape(len(chunk), G, K // G).sum(axis=2, dtype=np.float64)
            better = err < best_err
            best_err[better] = err[better]
            best[rows][better] = cand[better]
    return best


def _fp8_roundtrip(w: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    return dequantize_fp8(quantize_fp8(w, scales, fmt), scales, fmt)


def _inverse_cholesky(H: np.ndarray) -> np.ndarray:
    """Upper triangular U with U^T U = H^-1 (float64), the reference's `cholesky(cholesky_inverse(
    cholesky(H)), upper=True)`, from one factorization: with J the reversal and J H J = L L^T,
    U = J L^-1 J (upper, positive diagonal, hence that same unique factor). Dampening grows tenfold until H
    is numerically positive definite."""
    mean_diag = float(np.mean(np.diag(H)))
    K = len(H)
    damp = DAMP
    while True:
        Hd = H[::-1, ::-1].copy()  # J H J
        Hd[np.diag_indices(K)] += damp * mean_diag
        try:
            L = np.linalg.cholesky(Hd)
        except np.linalg.LinAlgError:
            if damp >= 1e3:
                raise
            damp *= 10.0
            continue
        return np.ascontiguousarray(np.linalg.inv(L)[::-1, ::-1])


class Hessian:
    """H = X^T X f64 (K, K) of the inputs that reach a linear on the calibration text, with what GPTQ derives
    from it (act order, the inverse Cholesky factor) computed once for every linear that reads the same
    inputs (q/k/v, gate/up)."""

    def __init__(self, H: np.ndarray):
        self.H = np.asarray(H, np.float64)

    @functools.cached_property
    def diag(self) -> np.ndarray:
        """f64 (K,): how strongly each input reaches the output (the scale search's weights)."""
        return np.diag(self.H).copy()

    @functools.cached_property
    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        """(order i64 (K,), U f32 (K, K) upper, rows and columns in that order). Inputs that never fired
        (zero diagonal) are decoupled: they round to nearest and take no error from the others."""
        H = self.H.copy()
        dead = self.diag <= 0
        H[dead, :] = 0.0
        H[:, dead] = 0.0
        H[dead, dead] = 1.0
        # act order: the columns the inputs weigh most first, while the most later columns can absorb their
        # error (scales are fixed beforehand, so the order is free of the block layout)
        order = np.argsort(-np.diag(H), kind="stable").astype(np.int64)
        return order, np.ascontiguousarray(_inverse_cholesky(H[np.ix_(order, order)]), np.float32)


def gptq_round(w: np.ndarray, hessian: Hessian, scales: np.ndarray, fmt: str) -> np.ndarray:
    """FP8 codes u8 (N, K) of w f32 (N, K) with the given scales f32 (N, G) (block b covers columns
    b*K/G ...), rounded column by column in act order with each column's error spread onto the later
    columns (hy_edge_ops.fp8.quantize_fp8_compensated: one parallel call per weight, rows in tiles)."""
    order, U = hessian.factor
    if fmt in minifloat.FORMATS:  # sub-byte FP: scales are the blocks' d (N, K / 32)
        return minifloat.quantize_compensated(np.ascontiguousarray(w, np.float32), scales, U, order, fmt)
    return quantize_fp8_compensated(np.ascontiguousarray(w, np.float32), scales, U, order, fmt)
