import ml_dtypes
import numpy as np
import pytest
from hy_edge_ops.fp8 import (
    E4M3,
    E5M2,
    FP8_MAX,
    decode_fp8,
    dequantize_fp8,
    encode_fp8,
    fp8_lut,
    has_nan_codes,
    quantize_fp8,
    quantize_fp8_compensated,
)
from hy_edge_ops.half import f32_to_half, half_to_f32
from hy_edge_ops.reference import dequantize
from numba import njit

ML = {E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}
FMTS = [E4M3, E5M2]
RNG = np.random.default_rng(11)


def ml_encode(x, fmt):
    m = FP8_MAX[fmt]
    return np.clip(x, -m, m).astype(ML[fmt]).view(np.uint8)  # clip = saturation; NaN passes through


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_all_codes(fmt):
    codes = np.arange(256, dtype=np.uint8)
    expect = codes.view(ML[fmt]).astype(np.float32)
    np.testing.assert_array_equal(fp8_lut(fmt), expect)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(decode_fp8(codes.reshape(16, 16), fmt), expect.reshape(16, 16))


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_roundtrip_all_finite_codes(fmt):
    vals = fp8_lut(fmt)
    finite = np.isfinite(vals)
    codes = np.arange(256, dtype=np.uint8)[finite]
    got = encode_fp8(vals[finite], fmt)
    # +0/-0 keep their sign bit
    np.testing.assert_array_equal(got, codes)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e-3, 0.05, 1.0, 37.0, 1e3, 1e5])
def test_encode_random_vs_ml_dtypes(fmt, scale):
    x = (np.random.default_rng(1).standard_normal((101, 37)) * scale).astype(np.float32)
    np.testing.assert_array_equal(encode_fp8(x, fmt), ml_encode(x, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_ties_and_subnormals(fmt):
    vals = fp8_lut(fmt).astype(np.float64)
    pos = np.unique(vals[np.isfinite(vals) & (vals >= 0)])
    mids = (pos[:-1] + pos[1:]) / 2  # exact ties -> round to even code
    x = np.concatenate(
        [
            mids,
            np.nextafter(mids, 0),
            np.nextafter(mids, np.inf),
            pos[:20] / 3,
            [pos[1] / 2, pos[1] / 2 * 0.999, pos[1] / 2 * 1.001, 1e-45, 1e-40],
        ]
    )
    x = np.concatenate([x, -x]).astype(np.float32)
    np.testing.assert_array_equal(encode_fp8(x, fmt), ml_encode(x, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_saturation_inf_nan(fmt):
    m = FP8_MAX[fmt]
    x = np.array([m, m * 1.03, m * 1.1, m * 2, 1e38, np.inf, -np.inf, -m * 1.5], np.float32)
    np.testing.assert_array_equal(encode_fp8(x, fmt), ml_encode(x, fmt))
    back = decode_fp8(encode_fp8(x, fmt), fmt)
    np.testing.assert_array_equal(back, [m, m, m, m, m, m, -m, -m])
    nan = encode_fp8(np.array([np.nan, -np.nan], np.float32), fmt)
    assert np.isnan(decode_fp8(nan, fmt)).all()
    np.testing.assert_array_equal(nan, ml_encode(np.array([np.nan, -np.nan], np.float32), fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_block_scales(fmt):
    rng = np.random.default_rng(2)
    n, k, g = 13, 101, 7  # Bk = 15, last block short
    w = rng.standard_normal((n, k)).astype(np.float32)
    scales = rng.uniform(0.001, 0.01, (n, g)).astype(np.float32)
    scales[3] = 0.0  # zero scale block -> zero codes
    codes = quantize_fp8(w, scales, fmt)
    bk = 15
    col = np.repeat(scales, bk, axis=1)[:, :k]
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = ml_encode((w / col).astype(np.float32), fmt)
    expect[3] = 0
    np.testing.assert_array_equal(codes, expect)
    deq = dequantize_fp8(codes, scales, fmt)
    np.testing.assert_allclose(deq, dequantize(codes, scales, fmt), rtol=1e-6)


def test_half_codec_inside_kernels():
    # every half bit pattern widens exactly (NaN stays NaN); float32 -> half rounds to nearest even
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    # signalling-NaN patterns raise the invalid flag on ARM when cast (x86 raises none): numpy warns there
    with np.errstate(invalid="ignore"):
        want = bits.view(np.float16).astype(np.float32)
    got = _widen(bits)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite]).all()
    x = np.concatenate([want[finite], RNG.standard_normal(10000).astype(np.float32) * 1e3, [1e6, -1e6, 3e-8]])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):  # 1e6 overflows to inf in both
        np.testing.assert_array_equal(_narrow(x), x.astype(np.float16).view(np.uint16))


@njit(cache=True)
def _widen(bits):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = half_to_f32(bits[i])
    return out


@njit(cache=True)
def _narrow(x):
    out = np.empty(x.shape[0], np.uint16)
    for i in range(x.shape[0]):
        out[i] = f32_to_half(x[i])
    return out


def compensated_reference(w, scales, u, order, fmt):
    """GPTQ's column loop in numpy, rounding by ml_dtypes: column order[j] rounded at step j, its error over
    u[j, j] taken off every later column (in order) times u[j, k]."""
    bk = w.shape[1] // scales.shape[1]
    rest = w[:, order].copy()  # (N, K) in processing order
    codes = np.empty(w.shape, np.uint8)
    for j, col in enumerate(order):
        s = scales[:, col // bk]
        c = ml_encode((rest[:, j] / s).astype(np.float32), fmt)
        codes[:, col] = c
        e = ((rest[:, j] - c.view(ML[fmt]).astype(np.float32) * s) / u[j, j]).astype(np.float32)
        rest[:, j + 1 :] -= e[:, None] * u[j, j + 1 :][None, :]
    return codes


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_compensated(fmt):
    rng = np.random.default_rng(5)
    n, k, g = 37, 48, 3  # rows: two full tiles and a short one; blocks of 16 columns
    w = rng.standard_normal((n, k)).astype(np.float32)
    scales = (np.abs(w).reshape(n, g, -1).max(axis=2) / np.float32(FP8_MAX[fmt]) * 0.9).astype(np.float32)  # clips
    a = rng.standard_normal((4 * k, k))
    u = np.ascontiguousarray(np.linalg.cholesky(np.linalg.inv(a.T @ a + np.eye(k))).T, np.float32)  # upper
    order = rng.permutation(k).astype(np.int64)
    codes = quantize_fp8_compensated(w, scales, u, order, fmt)
    np.testing.assert_array_equal(codes, compensated_reference(w, scales, u, order, fmt))
    assert not np.array_equal(codes, quantize_fp8(w, scales, fmt))
    diagonal = np.ascontiguousarray(np.diag(np.diag(u)))  # nothing to compensate: round to nearest
    np.testing.assert_array_equal(
        quantize_fp8_compensated(w, scales, diagonal, order, fmt), quantize_fp8(w, scales, fmt)
    )
    with pytest.raises(ValueError, match="order"):
        quantize_fp8_compensated(w, scales, u, np.zeros(k, np.int64), fmt)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_has_nan_codes(fmt):
    codes = quantize_fp8(RNG.standard_normal((300, 700)).astype(np.float32), np.full((300, 1), 0.01, np.float32), fmt)
    assert not has_nan_codes(codes, fmt)
    bad = codes.copy()
    bad[123, 456] = 0xFF  # a NaN code in both formats
    assert has_nan_codes(bad, fmt)
    bad = codes.copy()
    bad[0, 0] = encode_fp8(np.array([np.nan], np.float32), fmt)[0]  # what a NaN weight would encode to
    assert has_nan_codes(bad, fmt)


def test_errors_name_argument():
    with pytest.raises(ValueError, match="x"):
        encode_fp8(np.zeros(3, np.float64), E4M3)
    with pytest.raises(ValueError, match="fmt"):
        encode_fp8(np.zeros(3, np.float32), "e3m4")
    with pytest.raises(ValueError, match="scales"):
        quantize_fp8(np.zeros((4, 8), np.float32), np.ones((3, 1), np.float32), E4M3)
