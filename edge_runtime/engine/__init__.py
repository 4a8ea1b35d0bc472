"""The forward pass: a session on the numba kernels (numba_session, its compiled layer loop in layers) or on
onnxruntime (ort_session), the buffers, weights, memory plan and threads it runs with, and the .onnx file it
reads (model_file)."""
