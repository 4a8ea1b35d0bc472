"""KV cache rows (hy_edge_ops.kvrow): the branch-free E4M3 encoder and the FP8 row layout (codes, then
the row's float32 scale), against ml_dtypes."""

import numpy as np
import pytest
from hy_edge_ops import kvrow
from hy_edge_ops.fp8 import e4m3_code, fp8_lut
from kv_reference import E4M3, fp8_rows, ml_codes
from numba import njit


@njit
def _encode(x, out):
    for i in range(x.shape[0]):
        out[i] = e4m3_code(x[i])


@njit
def _store(dst, src):
    kvrow.store(dst, src)


@njit
def _factor(row, d):
    return kvrow.factor(row, d)


def test_e4m3_code_matches_ml_dtypes():
    rng = np.random.default_rng(3)
    grid = fp8_lut("e4m3").astype(np.float64)
    grid = np.unique(np.abs(grid[np.isfinite(grid)]))
    mids = (grid[:-1] + grid[1:]) / 2  # ties round to the even code
    x = np.concatenate(
        [
            grid, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), grid[:16] / 3,
            [448, 449, 463.9, 464, 465, 480, 1e6, 3e38, 1e-45, 2**-10, 2**-9 * 1.5, 2**-9 * 2.5],
            *(rng.standard_normal(20000) * s for s in (1e-3, 0.05, 1, 30, 300)),
        ]
    )  # fmt: skip
    x = np.concatenate([x, -x, [0.0, -0.0, np.inf, -np.inf]]).astype(np.float32)
    bits = rng.integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x, bits[~np.isnan(bits)]])
    out = np.empty(x.shape, np.int8)
    _encode(x, out)
    np.testing.assert_array_equal(out, ml_codes(x))


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 37.0, 1e6])
def test_store_writes_codes_then_scale(scale):
    src = (np.random.default_rng(4).standard_normal(72) * scale).astype(np.float32)
    row = np.zeros(76, np.int8)
    _store(row, src)
    want, values = fp8_rows(src)
    np.testing.assert_array_equal(row, want)
    s = want[72:].view("<f4")[0]
    assert _factor(row, 72) == np.float32(s * np.float32(2.0**60))  # scale x the E4M3 fold
    decoded = row[:72].view(E4M3).astype(np.float32) * s
    np.testing.assert_array_equal(decoded, values)
    assert np.abs(decoded - src).max() <= 2**-4 * np.abs(src).max()  # 3 mantissa bits: half a step of 2**-3


def test_zero_and_non_finite_rows():
    row = np.full(36, 7, np.int8)
    _store(row, np.zeros(32, np.float32))
    assert not row[:32].any() and row[32:].view("<f4")[0] == 1.0
    for bad in (np.nan, np.inf, -np.inf):
        src = np.ones(32, np.float32)
        src[5] = bad
        _store(row, src)
        assert np.isnan(row[32:].view("<f4")[0]) and np.isnan(_factor(row, 32))  # read back non-finite


def test_other_storages_store_as_before():
    src = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    f32, f16 = np.zeros(16, np.float32), np.zeros(16, np.uint16)
    _store(f32, src)
    _store(f16, src)
    np.testing.assert_array_equal(f32, src)
    np.testing.assert_array_equal(f16, src.astype(np.float16).view(np.uint16))
    assert _factor(f32, 16) == 1.0 and _factor(f16, 16) == 1.0
    assert [kvrow.row_length(k, 128) for k in ("fp32", "fp16", "fp8")] == [128, 128, 132]
