"""hy_edge_ops: Numba kernels for the hy-edge runtime and converter.

Modules: fp8 (encode/decode/quantize), linear (FP8/FP16 GEMV, tiled GEMM), norm, rope,
attention, conv, activation, sampling; reference holds the numpy references used by tests.
"""
