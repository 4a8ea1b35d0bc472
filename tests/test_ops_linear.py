import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hy_edge_ops import isa
from hy_edge_ops import reference as ref
from hy_edge_ops.fp8 import E4M3, E5M2, FP8_MAX, quantize_fp8
from hy_edge_ops.linear import (
    FusedLinear,
    embedding_rows,
    fuse,
    gemv_f16,
    gemv_f32,
    gemv_fp8,
    matmul_f16,
    matmul_f32,
    matmul_fp8,
    prepare,
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
    close(gemv_fp8(x, codes, scales, fmt, out), want)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_every_finite_code_decodes_exactly(fmt):
    # one row per code (NaN codes excluded: the loader refuses them), x = one-hot: out[n] is the decoded
    # value itself, subnormals, -0 and the largest codes included
    codes = np.array([c for c in range(256) if (c & 0x7F) < (0x7F if fmt == E4M3 else 0x7C)], np.uint8)
    w = np.zeros((codes.shape[0], 3), np.uint8)
    w[:, 1] = codes
    scales = np.ones((codes.shape[0], 1), np.float32)
    out = np.empty(codes.shape[0], np.float32)
    gemv_fp8(np.array([0.0, 1.0, 0.0], np.float32), w, scales, fmt, out)
    want = ref.dequantize(codes[:, None], np.ones((codes.shape[0], 1), np.float32), fmt)[:, 0]
    np.testing.assert_array_equal(out, want.astype(np.float32))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("g", [2, 3])  # groups of whole vectors (scales on the weights), and not
def test_scales_far_beyond_the_weights_range(fmt, g):
    # the decode's power of two is put back partly on the sum, partly in the scales: neither overflows
    # for scales up to ~1e20 (weights to ~1e22), nor loses small ones; beyond, prepare() refuses
    codes, scales = quantized(16, 64, g, fmt)
    x = RNG.standard_normal(64).astype(np.float32)
    with pytest.raises(ValueError, match="scales must be finite and below"):
        prepare(codes, fmt, scales * np.float32(1e30))
    for factor in (1e-30, 1e18):
        big = (scales * np.float32(factor)).astype(np.float32)
        out = np.empty(16, np.float32)
        got = gemv_fp8(x, codes, big, fmt, out)
        assert np.isfinite(got).all()
        close(got, ref.linear(x, ref.dequantize(codes, big, fmt)))


@pytest.mark.parametrize("dist", ["gaussian", "uniform codes"])
def test_any_code_distribution(dist):
    # uniformly random codes include every small (subnormal) code: same results as the reference
    n, k = 64, 256
    if dist == "gaussian":
        codes, scales = quantized(n, k, 1, E4M3)
    else:
        codes = RNG.integers(0, 256, (n, k)).astype(np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0
        scales = RNG.uniform(1e-4, 1e-2, (n, 1)).astype(np.float32)
    x = RNG.standard_normal(k).astype(np.float32)
    out = np.empty(n, np.float32)
    close(gemv_fp8(x, codes, scales, E4M3, out), ref.linear(x, ref.dequantize(codes, scales, E4M3)))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("t", [1, 2, 9, 130])
@pytest.mark.parametrize("k,g", [(75, 4), (128, 4)])  # groups of 19 columns; of 32 (whole vectors)
def test_matmul_fp8(fmt, t, k, g):
    n = 301
    codes, scales = quantized(n, k, g, fmt)
    x = RNG.standard_normal((t, k)).astype(np.float32)
    want = ref.linear(x, ref.dequantize(codes, scales, fmt))
    out = np.empty((t, n), np.float32)
    close(matmul_fp8(x, codes, scales, fmt, out), want)
    close(matmul_fp8(x, codes, scales, fmt, out, batched=True), want)


@pytest.mark.parametrize("storage", [E4M3, E5M2, "fp16", "fp32"])
@pytest.mark.parametrize("k,g", [(170, 3), (127, 2)])  # groups of 57 columns; of 64 (whole vectors), 63
def test_batched_rows_are_batch_invariant(storage, k, g):
    # a token's outputs in the batched kernel are bit-identical to the one-token kernel's, whatever the
    # other tokens are, for every batch size (the batched decode step relies on it); odd row count,
    # several scale groups, rows that are not a whole number of vectors
    n = 203
    if storage in (E4M3, E5M2):
        codes, scales = quantized(n, k, g, storage)
        op = prepare(codes, storage, scales)
        want = ref.dequantize(codes, scales, storage)
    else:
        w = (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)
        want = w.astype(np.float16).astype(np.float32) if storage == "fp16" else w
        op = prepare(w.astype(np.float16).view(np.uint16) if storage == "fp16" else w, storage)
    (lin,) = fuse([op])
    x = RNG.standard_normal((1, k)).astype(np.float32)
    alone = np.empty((1, n), np.float32)
    lin(x, (alone,))  # the one-token kernel
    close(alone[0], ref.linear(x[0], want))
    for b in range(1, 10):
        others = RNG.standard_normal((b, k)).astype(np.float32)
        for i in range(b):
            batch = others.copy()
            batch[i] = x[0]
            out = np.empty((b, n), np.float32)
            lin(batch, (out,), batched=True)
            np.testing.assert_array_equal(out[i], alone[0])


# AVX2 without AVX-512 (most laptops, desktops and VMs): 16 vector registers, so the kernels block
# differently (hy_edge_ops.dot); compiled for it here (hy_edge_ops.isa.codegen_env), run on this CPU
@pytest.mark.skipif(isa.ISA != "avx512", reason="compiles AVX2 code on an AVX-512 host")
def test_batched_rows_are_batch_invariant_on_avx2(tmp_path):
    env = dict(os.environ, **isa.codegen_env("avx2"), NUMBA_CACHE_DIR=str(tmp_path))
    check = (  # the ISA the kernels are shaped for, and the code numba emits for them: 256-bit, no 512
        "import numpy as np\n"
        "from hy_edge_ops import dot, isa, linear\n"
        "assert (isa.ISA, dot.LANES, dot.BATCH_ROWS, dot.BATCH_TOKENS) == ('avx2', 32, 1, 2)\n"
        "op = linear.prepare(np.zeros((8, 64), np.uint8), 'e4m3', np.ones((8, 1), np.float32))\n"
        "linear.FusedLinear([op])(np.zeros((1, 64), np.float32), (np.zeros((1, 8), np.float32),))\n"
        "asm = next(iter(linear._mv.inspect_asm().values()))\n"
        "assert 'ymm' in asm and 'zmm' not in asm\n"
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    test = f"{Path(__file__)}::test_batched_rows_are_batch_invariant"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "8 passed" in run.stdout


def test_fused_groups_equal_separate_linears():
    k = 96
    parts = [quantized(n, k, 1, E4M3) for n in (64, 32, 32)]
    ops = [prepare(c, E4M3, s) for c, s in parts]
    (group,) = fuse(ops)
    assert len(group.ops) == 3
    for t, batched in ((1, False), (1, True), (3, True), (20, False)):
        x = RNG.standard_normal((t, k)).astype(np.float32)
        outs = tuple(np.empty((t, op.shape[0]), np.float32) for op in ops)
        group(x, outs, batched)
        for (c, s), o in zip(parts, outs, strict=True):
            close(o, ref.linear(x, ref.dequantize(c, s, E4M3)))
    # a different storage or input size starts a new group
    other = prepare(RNG.standard_normal((8, k)).astype(np.float32), "fp32")
    assert [len(g.ops) for g in fuse(ops + [other])] == [3, 1]
    with pytest.raises(ValueError, match="storage"):
        FusedLinear([ops[0], other])


@pytest.mark.parametrize("t", [1, 5, 129])
def test_f16(t):
    n, k = 77, 131
    w = (RNG.standard_normal((n, k)) * 0.1).astype(np.float16)
    w[0, :5] = [6e-8, -6e-8, 1e-5, 65504, -0.0]  # subnormals, max
    bits = w.view(np.uint16)
    x = RNG.standard_normal((t, k)).astype(np.float32)
    want = ref.linear(x, ref.half_bits_to_f64(bits))
    out = np.empty((t, n), np.float32)
    close(matmul_f16(x, bits, out), want)
    out1 = np.empty(n, np.float32)
    close(gemv_f16(x[0], bits, out1), want[0])


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
        gemv_fp8(np.zeros(15, np.float32), codes, scales, E4M3, out)
    with pytest.raises(ValueError, match="out"):
        gemv_fp8(np.zeros(16, np.float32), codes, scales, E4M3, out[::2])
    with pytest.raises(ValueError, match="w"):
        gemv_fp8(np.zeros(16, np.float32), codes.astype(np.int8), scales, E4M3, out)
    with pytest.raises(ValueError, match="scales"):
        gemv_fp8(np.zeros(16, np.float32), codes, scales[:4], E4M3, out)
    with pytest.raises(ValueError, match="fmt"):
        gemv_fp8(np.zeros(16, np.float32), codes, scales, "e3m4", out)
