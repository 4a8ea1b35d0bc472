"""hy-edge runtime: run a converted .onnx model (FP8 weights, memory-mapped) with numba kernels or
onnxruntime.

    import edge_runtime
    model = edge_runtime.load("model.onnx")
    for r in model.stream("Hello!", max_tokens=32):
        print(r.text, end="", flush=True)

Names are imported on first use, so importing the package stays light. The file contract (spec, format,
errors) lives in `hy_edge_format`, which the converter imports without importing this package: importing
edge_runtime points numba's kernel cache at hy-edge's directory (cache_dirs.configure_jit_cache).
"""

from importlib import import_module

from hy_edge_format.errors import BudgetError, HyEdgeError, ModelFileError

from .cache_dirs import configure_jit_cache

configure_jit_cache()  # before anything imports hy_edge_ops: numba picks kernel cache paths at definition

_LAZY = {
    "KV_CACHES": ".engine.backend",
    "GenerationResponse": ".text.generate",
    "GenerationResult": ".text.generate",
    "Generator": ".text.generate",
    "stream_generate": ".text.generate",
    "Model": ".model",
    "load": ".model",
    "make_logits_processors": ".text.sampling",
    "make_sampler": ".text.sampling",
}

__all__ = ["BudgetError", "HyEdgeError", "ModelFileError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
