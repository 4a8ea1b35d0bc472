"""hy-edge runtime: run a converted .onnx model (FP8 weights, memory-mapped) with numba kernels or
onnxruntime.

    import edge_runtime
    model = edge_runtime.load("model.onnx")
    for r in model.stream("Hello!", max_tokens=32):
        print(r.text, end="", flush=True)

Names are imported on first use, so `edge_runtime.spec` / `edge_runtime.format` (the file contract the
converter also reads) stay light.
"""

from importlib import import_module

from .cache_dirs import configure_jit_cache
from .errors import BudgetError, HyEdgeError, ModelFileError

configure_jit_cache()  # before anything imports hy_edge_ops: numba picks kernel cache paths at definition

_LAZY = {
    "KV_CACHES": ".backend",
    "GenerationResponse": ".generate",
    "GenerationResult": ".generate",
    "Generator": ".generate",
    "stream_generate": ".generate",
    "Model": ".model",
    "load": ".model",
    "make_logits_processors": ".sampling",
    "make_sampler": ".sampling",
}

__all__ = ["BudgetError", "HyEdgeError", "ModelFileError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
