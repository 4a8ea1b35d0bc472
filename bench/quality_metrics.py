"""The quality race's figures, as pure functions of arrays and files: per-token KL divergence against a
reference, its mean and 99th percentile, perplexity ratio, top-1 agreement, and the weight bytes one
decode step reads from a GGUF (llama.cpp) or a converted ONNX file (hy-edge).

The KL divergence is llama.cpp's `perplexity --kl-divergence` one: per predicted token,
KL(reference || variant) = sum_v p_ref(v) (log p_ref(v) - log p_var(v)), over the full vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def log_probs(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, float64: (T, V) -> (T, V)."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits: (T, V) expected, got shape {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def kl_divergence(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || variant) per row (T,) float64 from two (T, V) log-probability arrays."""
    if ref_lp.shape != lp.shape or ref_lp.ndim != 2:
        raise ValueError(f"two equal (T, V) shapes expected, got {ref_lp.shape} and {lp.shape}")
    kl = np.einsum("tv,tv->t", np.exp(ref_lp), ref_lp - lp)
    return np.maximum(kl, 0.0)  # rounding can leave -1e-17 where both rows are equal


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("values: empty")
    return float(np.percentile(v, q))


def perplexity_ratio(nll: np.ndarray, ref_nll: np.ndarray) -> float:
    """PPL(variant) / PPL(reference) over the same predicted tokens: exp(mean nll - mean ref nll)."""
    nll, ref_nll = np.asarray(nll, np.float64), np.asarray(ref_nll, np.float64)
    if nll.shape != ref_nll.shape or nll.size == 0:
        raise ValueError(f"two equal, non-empty shapes expected, got {nll.shape} and {ref_nll.shape}")
    return float(math.exp(nll.mean() - ref_nll.mean()))


@dataclass
class Tally:
    """One variant's per-token figures, appended window by window (the (T, V) arrays are never kept)."""

    nll: list[np.ndarray] = field(default_factory=list)  # (T,) float64 each
    argmax: list[np.ndarray] = field(default_factory=list)  # (T,) int64
    kl: list[np.ndarray] = field(default_factory=list)  # (T,) float64, against the reference

    def add(self, lp: np.ndarray, targets: np.ndarray, ref_lp: np.ndarray) -> None:
        """lp, ref_lp (T, V) log-probabilities at T positions whose next tokens are targets (T,)."""
        self.nll.append(-lp[np.arange(len(targets)), targets])
        self.argmax.append(lp.argmax(axis=1))
        self.kl.append(kl_divergence(ref_lp, lp))

    def summary(self, ref: Tally) -> dict:
        nll, ref_nll = np.concatenate(self.nll), np.concatenate(ref.nll)
        kl = np.concatenate(self.kl)
        return {
            "tokens": int(nll.size),
            "perplexity": float(math.exp(nll.mean())),
            "perplexity_ratio": perplexity_ratio(nll, ref_nll),
            "kl_mean": float(kl.mean()),
            "kl_median": percentile(kl, 50),
            "kl_p99": percentile(kl, 99),
            "kl_max": float(kl.max()),
            "top1_agreement": float(np.mean(np.concatenate(self.argmax) == np.concatenate(ref.argmax))),
        }


# -- bytes one decode step reads ---------------------------------------------------------------------
def gguf_bytes_per_token(path: Path) -> int:
    """Every tensor of a GGUF once. A tied model (no output.weight) reads token_embd as its output matrix
    each token, counted once; a model with its own output.weight only gathers one embedding row, so its
    token_embd is not counted."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


def onnx_bytes_per_token(path: Path) -> int:
    """Every initializer of a converted file once, except the embedding when the file has an lm_head of
    its own (decode then gathers one embedding row); a tied file's embedding is its head, counted once.
    The rule is bench/artifacts.py's, which the speed race uses."""
    from artifacts import hy_edge_bytes_per_token

    return hy_edge_bytes_per_token(path)


def file_bytes(path: Path) -> int:
    """A model's size on disk: the file, plus its external data for ONNX."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
