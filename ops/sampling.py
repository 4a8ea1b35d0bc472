"""Sampling primitives on float32 (V,) logits, Hugging Face logits-processor semantics.

Masks set excluded logits to -inf in place; the runtime composes them (penalty -> top-k ->
top-p -> min-p -> softmax -> sample_categorical). V is ~120k, so selection uses argpartition.
"""

from __future__ import annotations

import numpy as np

_TIE = 1e-6  # cumulative-probability slack so exact boundaries (0.5 + 0.3 vs 0.8) are not at float's mercy


def _need_logits(logits) -> None:
    if not isinstance(logits, np.ndarray) or logits.ndim != 1 or logits.dtype not in (np.float32, np.float64):
        raise ValueError("logits must be a 1-D float32 or float64 array")
    if logits.size == 0:
        raise ValueError("logits must not be empty")


def softmax(logits: np.ndarray) -> np.ndarray:
    """probs f64 (V,) = exp(l - max) / sum; -inf logits get probability 0."""
    _need_logits(logits)
    z = logits.astype(np.float64)
    z -= z.max()
    np.exp(z, out=z)
    z /= z.sum()
    return z


def apply_repetition_penalty(logits: np.ndarray, token_ids: np.ndarray, penalty: float) -> np.ndarray:
    """In place: each distinct id's logit is divided by penalty if > 0, else multiplied (HF)."""
    _need_logits(logits)
    ids = np.unique(np.asarray(token_ids, dtype=np.int64))
    if ids.size == 0 or penalty == 1.0:
        return logits
    if ids[0] < 0 or ids[-1] >= logits.shape[0]:
        raise ValueError(f"token_ids must lie in [0, {logits.shape[0]})")
    sel = logits[ids]
    logits[ids] = np.where(sel < 0, sel * penalty, sel / penalty)
    return logits


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """In place: keep logits >= the k-th largest (ties at the boundary kept, as HF); k <= 0 disables."""
    _need_logits(logits)
    v = logits.shape[0]
    if k <= 0 or k >= v:
        return logits
    kth = np.partition(logits, v - k)[v - k]
    logits[logits < kth] = -np.inf
    return logits


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """In place: keep the smallest top set whose probability mass reaches p (always >= 1 token)."""
    _need_logits(logits)
    if p >= 1.0:
        return logits
    v = logits.shape[0]
    probs = softmax(logits)
    m = min(v, 64)
    while True:
        top = np.argpartition(probs, v - m)[v - m :] if m < v else np.arange(v)
        top = top[np.argsort(-probs[top], kind="stable")]
        before = np.cumsum(probs[top]) - probs[top]  # mass strictly above each candidate
        n_keep = int(np.count_nonzero(before < p - _TIE))
        if n_keep < m or m == v:
            break
        m = min(v, m * 4)
    keep = np.zeros(v, dtype=bool)
    keep[top[: max(1, n_keep)]] = True
    logits[~keep] = -np.inf
    return logits


def min_p_mask(logits: np.ndarray, min_p: float) -> np.ndarray:
    """In place: keep tokens with prob >= min_p * max prob (the argmax always survives)."""
    _need_logits(logits)
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    logits[probs < min_p * probs.max() * (1.0 - _TIE)] = -np.inf
    return logits


def sample_categorical(probs: np.ndarray, u: float) -> int:
    """Inverse CDF: smallest i with cumsum(probs)[i] > u * sum(probs); never a zero-probability index."""
    if not isinstance(probs, np.ndarray) or probs.ndim != 1 or probs.size == 0:
        raise ValueError("probs must be a non-empty 1-D array")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must lie in [0, 1), got {u}")
    cdf = np.cumsum(probs, dtype=np.float64)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= probs.shape[0] or probs[i] <= 0:
        i = int(np.flatnonzero(probs > 0)[-1])  # rounding ran past the last non-zero entry
    return i


def argmax(logits: np.ndarray) -> int:
    """Index of the largest logit (first on ties)."""
    _need_logits(logits)
    return int(np.argmax(logits))
