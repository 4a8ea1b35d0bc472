"""The interface the Generator drives, and the factory that opens a session on either backend.

A backend session holds one conversation's cache. Both implementations (NumbaSession in
numba_session.py, OrtSession in ort_session.py) provide:

    spec: ModelSpec
    max_context: int             # positions the cache can hold
    n_cached: int                # positions it holds now
    forward(ids (T,) int64, all_logits=False) -> (V,) logits of the last token | (T, V)
    truncate(n)                  # forget positions >= n
    reset()                      # truncate(0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.spec import ModelSpec

if TYPE_CHECKING:
    from ..model import Model

BACKENDS = ("numba", "onnxruntime")


class PythonLayerLoop(UserWarning):
    """The numba session's compiled layer loop (layers.py) cannot run a model, the Python one does: said once
    (the CLI prints it as a note). Defined here, where the CLI can import it without numba."""


# KV cache types of the numba backend (hy_edge_ops.kvrow): fp16 halves the fp32 cache, fp8 (E4M3 rows with
# a scale each) takes 26% of it at D = 128
KV_CACHES = ("fp32", "fp16", "fp8")


class Backend(Protocol):
    spec: ModelSpec
    max_context: int
    n_cached: int

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray: ...

    def truncate(self, n: int) -> None: ...

    def reset(self) -> None: ...


def open_session(
    model: Model,
    backend: str = "numba",
    *,
    threads: int | None = None,
    max_context: int | None = None,
    max_memory: int | None = None,
    prefill_chunk: int | None = None,
    slots: int = 1,
    kv_cache: str = "fp32",
) -> Backend:
    """A new session on `model` with the chosen backend; the memory budget is checked first.
    `slots` (sequences decoded together, `NumbaSession.decode_batch`) and `kv_cache` (KV_CACHES: 'fp16'
    halves the KV memory, 'fp8' quarters it) are numba-backend options."""
    from .memory import DEFAULT_BUDGET
    from .threads import resolve_threads, warn_if_busy

    adaptive = threads is None  # the default count gives way to other busy processes
    threads = resolve_threads(threads)
    if not adaptive:
        warn_if_busy(threads)  # a count the caller chose does not: say so once if others are busy
    budget = DEFAULT_BUDGET if max_memory is None else max_memory
    if backend == "numba":
        from .numba_session import DEFAULT_PREFILL_CHUNK, NumbaSession

        return NumbaSession(
            model.spec,
            model.weights,
            activations=model.activations,
            max_context=max_context,
            prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK,
            max_memory=budget,
            threads=threads,
            slots=slots,
            kv_cache=kv_cache,
            adaptive_threads=adaptive,
        )
    if backend == "onnxruntime":
        if slots != 1 or kv_cache != "fp32":
            raise HyEdgeError("the onnxruntime backend runs one sequence with an fp32 KV cache")
        from .ort_session import OrtSession

        return OrtSession(model.path, threads=threads, max_context=max_context, max_memory=budget)
    raise HyEdgeError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
