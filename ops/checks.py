"""Argument checks shared by the public wrappers (run once per call, before any kernel)."""

from __future__ import annotations

import numpy as np


def need_array(name: str, a, dtype, ndim: int, shape=None) -> None:
    """Raise ValueError naming `name` unless `a` is a C-contiguous ndarray of dtype/ndim (and shape)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
        raise ValueError(
            f"{name} must be a {np.dtype(dtype).name} array with {ndim} dims, got "
            f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
        )
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
