"""FP4 / FP6 block weights (hy_edge_ops.blockq's e2m1, e3m2, e2m3): the code values against ml_dtypes, the
stored layout unpacked by hand, and the kernels (one token, batched, prefill, embedding rows) against numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hy_edge_ops import blockq, isa, linear
from runtime_helpers import rel_err

MINIFLOATS = ("e2m1", "e3m2", "e2m3")
ML_DTYPE = {"e2m1": "float4_e2m1fn", "e3m2": "float6_e3m2fn", "e2m3": "float6_e2m3fn"}


def _random_blocks(storage, n_rows, k_dim, rng):
    g = k_dim // 32
    w = rng.integers(0, 256, (n_rows, g * blockq.CODE_BYTES[storage])).astype(np.uint8)
    scales = (rng.random((n_rows, g)) * 0.02 + 1e-3).astype(np.float16)
    scales[0, 0] = np.float16(6e-8)  # a subnormal half scale: value(code) * d is still exact in float32
    return w, scales.view(np.uint16)


def _codes_by_hand(storage, w):
    """(N, K) codes of the stored bytes, written out from the layout: byte j of a block holds weight j's
    low 4 bits in its low nibble and weight j + 16's in its high; FP6 byte 16 + j the high 2 bits of
    weights j, j + 8, j + 16, j + 24, from bit 0 up."""
    n_rows = w.shape[0]
    b = w.reshape(n_rows, -1, blockq.CODE_BYTES[storage]).astype(np.int64)
    codes = np.zeros((n_rows, b.shape[1], 32), np.int64)
    for j in range(16):
        codes[:, :, j] = b[:, :, j] % 16
        codes[:, :, j + 16] = b[:, :, j] // 16
    if storage != "e2m1":
        for i in range(32):
            codes[:, :, i] += (b[:, :, 16 + i % 8] // 4 ** (i // 8)) % 4 * 16
    return codes.reshape(n_rows, -1).astype(np.uint8)


@pytest.mark.parametrize("storage", MINIFLOATS)
def test_codes_and_stored_weights_match_ml_dtypes(storage):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (installed with onnx) is the reference")
    mf = np.dtype(getattr(ml_dtypes, ML_DTYPE[storage]))
    values = blockq.minifloat_values(storage)
    codes = np.arange(values.shape[0], dtype=np.uint8)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, codes.view(mf).astype(np.float32))
    np.testing.assert_array_equal(np.signbit(values), np.signbit(codes.view(mf).astype(np.float32)))
    w, scales = _random_blocks(storage, 5, 128, np.random.default_rng(3))
    d = np.repeat(scales.view(np.float16).astype(np.float32), 32, axis=1)
    want = _codes_by_hand(storage, w).view(mf).astype(np.float32) * d
    np.testing.assert_array_equal(blockq.dequantize(storage, w, scales), want)


@pytest.mark.parametrize("storage", MINIFLOATS)
def test_minifloat_kernels_match_numpy(storage):
    rng = np.random.default_rng(1)
    n_rows, k_dim = 45, 320
    w, scales = _random_blocks(storage, n_rows, k_dim, rng)
    weights = blockq.dequantize(storage, w, scales)

    def run(x, batched=False):
        out = np.empty((x.shape[0], n_rows), np.float32)
        return linear.matmul_blocks(x, w, storage, scales, None, out, batched)

    # each weight exactly: one-hot tokens pick single columns (first and last lanes, both nibbles)
    cols = [0, 15, 16, 31, 33, 300, 319]
    one_hot = np.eye(k_dim, dtype=np.float32)[cols]
    np.testing.assert_array_equal(run(one_hot[:1]), weights[:, cols[:1]].T)  # one-token kernel
    np.testing.assert_array_equal(run(one_hot, batched=True), weights[:, cols].T)  # batched kernel
    np.testing.assert_array_equal(run(np.eye(k_dim, dtype=np.float32)[:40]), weights[:, :40].T)  # prefill
    x = rng.standard_normal((20, k_dim)).astype(np.float32)
    ref = x.astype(np.float64) @ weights.T.astype(np.float64)
    one = np.concatenate([run(x[t : t + 1]) for t in range(20)])
    for T in (1, 2, 3, 5, 8, 20):  # one-token, grouped and prefill kernels
        assert rel_err(run(x[:T]), ref[:T]) < 1e-6, T
        np.testing.assert_array_equal(run(x[:T], batched=True), one[:T])  # batch-invariant


def _q8_rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to int8 per block of 32 in numpy: rint(x / s) * s, s = max(amax / 127, float32's tiny)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    s = np.maximum(np.abs(blocks).max(-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    return (np.rint(blocks / s.astype(np.float32)) * s).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("storage", blockq.INTEGER_INPUTS)
def test_integer_input_kernels_match_numpy(storage):
    """Weights viewed for q8 inputs: every kernel multiplies the inputs rounded as numpy rounds them by
    the exact weights (integer dots per block); the batched kernel is batch-invariant; a NaN input gives
    NaN outputs (not garbage from converting it to int8)."""
    rng = np.random.default_rng(2)
    n_rows, k_dim = 45, 352  # 11 blocks: an odd last block
    w, scales = _random_blocks(storage, n_rows, k_dim, rng)
    weights = blockq.dequantize(storage, w, scales).astype(np.float64)
    op = linear.prepare(w, storage, scales, activations="q8")

    def run(x, batched=False):
        return linear._run(op, x, np.empty((x.shape[0], n_rows), np.float32), batched)

    x = rng.standard_normal((20, k_dim)).astype(np.float32) * np.float32(3.0)
    x[3, 40:72] = 0.0  # a block of zeros
    rounded = _q8_rounded(x)
    np.testing.assert_array_equal(blockq.rounded_inputs(x), rounded)
    codes = blockq.quantize_inputs(x)
    np.testing.assert_array_equal(codes[:, :k_dim] * codes.view(np.float32)[:, k_dim // 4 :].repeat(32, 1), rounded)
    ref = rounded.astype(np.float64) @ weights.T
    assert rel_err(ref, x.astype(np.float64) @ weights.T) > 1e-3  # the rounding is there to be seen
    one = np.concatenate([run(x[t : t + 1]) for t in range(20)])
    for T in (1, 2, 3, 5, 8, 20):  # one-token, grouped and prefill kernels
        assert rel_err(run(x[:T]), ref[:T]) < 1e-6, T
        np.testing.assert_array_equal(run(x[:T], batched=True), one[:T])  # batch-invariant
    bad = x[:2].copy()
    bad[1, 100] = np.nan
    out = run(bad)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    with pytest.raises(ValueError, match="q8"):
        linear.prepare(w, storage, scales, activations="q4")
    with pytest.raises(ValueError, match="q8 inputs"):
        linear.prepare(np.zeros((2, 32), np.int8), "int8", np.ones((2, 1), np.uint16), activations="q8")


@pytest.mark.parametrize("storage", MINIFLOATS)
def test_decode_rows_and_mapped_views(storage):
    rng = np.random.default_rng(4)
    w, scales = _random_blocks(storage, 12, 96, rng)
    weights = blockq.dequantize(storage, w, scales)
    ids = np.array([3, 0, 11, 3], np.int64)
    halves = blockq.pack_scales(storage, scales).view(np.uint16)
    out = np.empty((4, 96), np.float32)
    blockq.decode_rows(blockq.code_view(np.ascontiguousarray(w[ids]), storage), halves, ids, out)
    np.testing.assert_array_equal(out, weights[ids])
    # a tensor in a mapped file starts at a multiple of 32 bytes: the kernels' view of it needs no copy
    x = rng.standard_normal((1, 96)).astype(np.float32)
    want = linear.matmul_blocks(x, w, storage, scales, None, np.empty((1, 12), np.float32))
    buf = np.zeros(w.nbytes + 192, np.uint8)
    base = -buf.ctypes.data % 64
    for at in (base + 32, base + 96):
        mapped = buf[at : at + w.nbytes].reshape(w.shape)
        mapped[:] = w
        op = linear.prepare(mapped, storage, scales)
        assert np.shares_memory(op.w, mapped)
        got = linear.matmul_blocks(x, mapped, storage, scales, None, np.empty((1, 12), np.float32))
        np.testing.assert_array_equal(got, want)
    odd = buf[base + 1 : base + 1 + w.nbytes].reshape(w.shape)
    with pytest.raises(ValueError, match="w: .* multiple of"):
        linear.prepare(odd, storage, scales)


def test_minifloat_blocks_refuse_bad_arguments():
    rng = np.random.default_rng(2)
    w, scales = _random_blocks("e3m2", 4, 64, rng)
    out, x = np.empty(4, np.float32), np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="offsets"):
        linear.matmul_blocks(x, w, "e3m2", scales, scales, out)
    with pytest.raises(ValueError, match="scales"):
        linear.matmul_blocks(x, w, "e3m2", scales[:, :1], None, out)
    with pytest.raises(ValueError, match="^w "):
        linear.matmul_blocks(x, w[:, :40], "e3m2", scales, None, out)  # not whole 24-byte blocks
    with pytest.raises(ValueError, match="^w "):
        linear.matmul_blocks(x, w.view(np.int8), "e3m2", scales, None, out)
    with pytest.raises(ValueError, match="^x "):
        linear.matmul_blocks(np.zeros(32, np.float32), w, "e3m2", scales, None, out)
    with pytest.raises(ValueError, match="storage"):
        linear.matmul_blocks(x, w, "e4m2", scales, None, out)
    with pytest.raises(ValueError, match="storage"):
        blockq.minifloat_values("e4m3")


def _kernel_test_in(isa_name: str, env: dict, prelude: str = "") -> None:
    """test_minifloat_kernels_match_numpy and test_integer_input_kernels_match_numpy in a fresh process under
    `env` (after `prelude`), whose kernels are shaped for `isa_name`."""
    args = ["-o", "addopts=", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "kernels_match_numpy"]
    check = f"from hy_edge_ops import isa\nassert isa.ISA == {isa_name!r}, isa.ISA"
    code = f"import sys, pytest\n{prelude}\n{check}\nsys.exit(pytest.main({args!r}))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "5 passed" in run.stdout


# AVX2 decodes through vpshufb tables (hy_edge_ops.blockq): compiled for it here
# (hy_edge_ops.isa.codegen_env), run on this CPU
@pytest.mark.skipif(isa.ISA != "avx512", reason="compiles AVX2 code on an AVX-512 host")
def test_minifloat_kernels_on_avx2(tmp_path):
    _kernel_test_in("avx2", dict(os.environ, **isa.codegen_env("avx2"), NUMBA_CACHE_DIR=str(tmp_path)))


# NEON's shapes (LANES 16) and decode (shifts and masks through 16-bit lanes) are plain LLVM vectors:
# the same IR, compiled for this CPU, as on the Raspberry Pi 5
@pytest.mark.skipif(isa.ISA not in ("avx512", "avx2"), reason="checks the NEON IR on x86")
def test_minifloat_kernels_in_neon_shapes(tmp_path):
    prelude = "import platform\nplatform.machine = lambda: 'aarch64'  # hy_edge_ops.isa: NEON shapes"
    _kernel_test_in("neon", dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)), prelude)
