import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.fp8 import E4M3, E5M2, FP8_MAX, fp8_lut, fp16_lut, quantize_fp8
from hy_edge_ops.linear import (
    embedding_rows,
    gemv_f16,
    gemv_f32,
    gemv_fp8,
    matmul_f16,
    matmul_f32,
    matmul_fp8,
)

RNG = np.random.default_rng(3)


def quantized(n, k, g, fmt):
    w = (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)
    amax = np.abs(w).max(axis=1, keepdims=True)
    scales = np.repeat(amax / FP8_MAX[fmt], g, axis=1).astype(np.float32)
    scales *= RNG.uniform(0.7, 1.3, scales.shape).astype(np.float32)  # distinct per block
    return quantize_fp8(w, scales, fmt), scales


def close(got, want, rtol=2e-6):
    tol = rtol * max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("n,k,g", [(1, 1, 1), (37, 101, 1), (29, 203, 7), (130, 1000, 3)])
def test_gemv_fp8(fmt, n, k, g):
    codes, scales = quantized(n, k, g, fmt)
    x = RNG.standard_normal(k).astype(np.float32)
    want = ref.linear(x, ref.dequantize(codes, scales, fmt))
    out = np.empty(n, np.float32)
    close(gemv_fp8(x, codes, scales, fp8_lut(fmt), out), want)
    lut = fp8_lut(fmt).copy()  # equal table, other object: still exact
    close(gemv_fp8(x, codes, scales, lut, out), want)


def test_gemv_fp8_generic_table_and_special_codes():
    codes = np.array([[0x7F, 1, 2], [1, 0x08, 0x80]], np.uint8)  # NaN, subnormals, -0
    scales = np.ones((2, 1), np.float32)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    out = np.empty(2, np.float32)
    gemv_fp8(x, codes, scales, fp8_lut(E4M3), out)
    assert np.isnan(out[0])
    np.testing.assert_allclose(out[1], 2.0**-9 + 2 * 2.0**-6, rtol=1e-6)
    lut = np.arange(256, dtype=np.float32)  # non-FP8 table: gather path
    gemv_fp8(x, codes, scales, lut, out)
    np.testing.assert_allclose(out, [127 + 2 + 6, 1 + 16 + 384])


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("t", [1, 2, 9, 130])
def test_matmul_fp8(fmt, t):
    n, k, g = 301, 75, 4
    codes, scales = quantized(n, k, g, fmt)
    x = RNG.standard_normal((t, k)).astype(np.float32)
    want = ref.linear(x, ref.dequantize(codes, scales, fmt))
    out = np.empty((t, n), np.float32)
    close(matmul_fp8(x, codes, scales, fp8_lut(fmt), out), want)


@pytest.mark.parametrize("t", [1, 5, 129])
def test_f16(t):
    n, k = 77, 131
    w = (RNG.standard_normal((n, k)) * 0.1).astype(np.float16)
    w[0, :5] = [6e-8, -6e-8, 1e-5, 65504, -0.0]  # subnormals, max
    bits = w.view(np.uint16)
    x = RNG.standard_normal((t, k)).astype(np.float32)
    want = ref.linear(x, ref.half_bits_to_f64(bits))
    out = np.empty((t, n), np.float32)
    close(matmul_f16(x, bits, fp16_lut(), out), want)
    out1 = np.empty(n, np.float32)
    close(gemv_f16(x[0], bits, fp16_lut(), out1), want[0])


def test_f32():
    w = RNG.standard_normal((19, 23)).astype(np.float32)
    x = RNG.standard_normal((3, 23)).astype(np.float32)
    out = np.empty((3, 19), np.float32)
    close(matmul_f32(x, w, out), ref.linear(x, w))
    out1 = np.empty(19, np.float32)
    close(gemv_f32(x[1], w, out1), ref.linear(x[1], w))


def test_embedding_rows():
    table = RNG.standard_normal((50, 12)).astype(np.float32)
    ids = np.array([3, 0, 49, 3], np.int64)
    out = np.empty((4, 12), np.float32)
    np.testing.assert_array_equal(embedding_rows(table, ids, out), table[ids])
    half = table.astype(np.float16)
    got = embedding_rows(half.view(np.uint16), ids, out)
    np.testing.assert_array_equal(got, half[ids].astype(np.float32))
    with pytest.raises(ValueError, match="ids"):
        embedding_rows(table, np.array([50], np.int64), out[:1])


def test_errors_name_argument():
    codes, scales = quantized(8, 16, 1, E4M3)
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError, match="x"):
        gemv_fp8(np.zeros(15, np.float32), codes, scales, fp8_lut(E4M3), out)
    with pytest.raises(ValueError, match="out"):
        gemv_fp8(np.zeros(16, np.float32), codes, scales, fp8_lut(E4M3), out[::2])
    with pytest.raises(ValueError, match="w"):
        gemv_fp8(np.zeros(16, np.float32), codes.astype(np.int8), scales, fp8_lut(E4M3), out)
    with pytest.raises(ValueError, match="scales"):
        gemv_fp8(np.zeros(16, np.float32), codes, scales[:4], fp8_lut(E4M3), out)
