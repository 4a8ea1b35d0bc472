"""hy-edge's file contract: what the converter writes and the runtime reads, owned by neither.

- `spec`: ModelSpec, the one description of an architecture (from a Hugging Face config.json);
- `format`: the tensor-name table, the graph's input/output names and the metadata keys of a converted file;
- `onnx_header`: the metadata and initializer headers of an .onnx file, read without onnx;
- `errors`: the errors a user can cause (`HyEdgeError` and its kinds), raised on both sides;
- `safe_json`: bounded, typed JSON from files a user hands over;
- `sizes`, `heap`: byte sizes as people read them, and handing freed heap pages back to the OS.

This package imports only the standard library and numpy: importing it sets nothing in the process
(edge_runtime's import configures numba's kernel cache; the converter imports only this).
"""
