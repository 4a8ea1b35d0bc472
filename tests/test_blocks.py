"""Block-integer weights (GGUF Q8_0 / Q4_0 / Q4_1 kept exactly): the kernels against numpy, the stored
weights against gguf's own dequantizer, and the converted model against transformers on both backends."""

from __future__ import annotations

import checkpoints as ck
import numpy as np
import pytest
from hy_edge_convert import QuantPolicy, convert
from hy_edge_format import format as F
from hy_edge_ops import blockq, linear
from onnx_weights import dequantized
from runtime_helpers import hf_logits, rel_err

import edge_runtime

STORAGE = {"Q8_0": "int8", "Q4_0": "uint4", "Q4_1": "uint4"}


def _random_blocks(storage, n_rows, k_dim, rng):
    g = k_dim // 32
    scales = (rng.random((n_rows, g)) * 0.02 + 1e-3).astype(np.float16).view(np.uint16)
    if storage == "int8":
        return rng.integers(-128, 128, (n_rows, k_dim)).astype(np.int8), scales, None
    offsets = (rng.standard_normal((n_rows, g)) * 0.01).astype(np.float16).view(np.uint16)
    return rng.integers(0, 256, (n_rows, k_dim // 2)).astype(np.uint8), scales, offsets


def _numpy_weights(storage, w, scales, offsets):
    """Independent of blockq: the layout written out by hand (uint4: low nibbles are weights 0..15)."""
    d = scales.view(np.float16).astype(np.float32)
    n_rows = w.shape[0]
    if storage == "int8":
        return (w.astype(np.float32).reshape(n_rows, -1, 32) * d[:, :, None]).reshape(n_rows, -1)
    b = w.reshape(n_rows, -1, 16)
    q = np.concatenate([b % 16, b // 16], axis=2).astype(np.float32)
    m = offsets.view(np.float16).astype(np.float32)
    return (q * d[:, :, None] + m[:, :, None]).reshape(n_rows, -1)


@pytest.mark.parametrize("storage", ["int8", "uint4"])
def test_block_kernels_match_numpy(storage):
    rng = np.random.default_rng(1)
    n_rows, k_dim = 45, 320
    w, scales, offsets = _random_blocks(storage, n_rows, k_dim, rng)
    weights = _numpy_weights(storage, w, scales, offsets)
    assert np.array_equal(blockq.dequantize(storage, w, scales, offsets), weights)
    x = rng.standard_normal((20, k_dim)).astype(np.float32)
    ref = x.astype(np.float64) @ weights.T.astype(np.float64)
    one = np.stack(
        [linear.matmul_blocks(x[t], w, storage, scales, offsets, np.empty(n_rows, np.float32)) for t in range(20)]
    )
    for T in (1, 2, 3, 5, 8, 20):  # one-token, grouped and prefill kernels
        out = linear.matmul_blocks(x[:T], w, storage, scales, offsets, np.empty((T, n_rows), np.float32))
        assert rel_err(out, ref[:T]) < 1e-6, T
        batched = linear.matmul_blocks(x[:T], w, storage, scales, offsets, np.empty((T, n_rows), np.float32), True)
        assert np.array_equal(batched, one[:T]), T  # batch-invariant: each token as when alone


def test_block_kernels_refuse_bad_arguments():
    rng = np.random.default_rng(2)
    w, scales, offsets = _random_blocks("uint4", 4, 64, rng)
    out = np.empty(4, np.float32)
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="offsets"):
        linear.matmul_blocks(x, w, "uint4", scales, None, out)
    with pytest.raises(ValueError, match="scales"):
        linear.matmul_blocks(x, w, "uint4", scales[:, :1], offsets, out)
    bad = scales.copy()
    bad[0, 0] = np.float16(np.inf).view(np.uint16)
    with pytest.raises(ValueError, match="finite"):
        linear.matmul_blocks(x, w, "uint4", bad, offsets, out)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_kept_exactly_and_match_transformers(qtype, tmp_path):
    from hy_edge_convert.checkpoint import open_checkpoint
    from test_convert import IDS, hf_model

    path = ck.make_gguf_llama(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, tie=qtype == "Q4_1")
    out = tmp_path / "model.onnx"
    report = convert(path, out, QuantPolicy())  # the default: blocks kept
    linears = {n: t for n, t in report.tensors.items() if F.is_linear(n)}
    assert {t["storage"] for t in linears.values()} == {STORAGE[qtype]}
    assert F.LM_HEAD not in report.tensors or qtype != "Q4_1"  # a tied head reads the kept embedding
    stored = dequantized(out)  # onnx's own unpacking of the file
    with open_checkpoint(path) as ckpt:
        for name in linears:
            assert np.array_equal(stored[name], ckpt.tensors[name].load()), name  # gguf's dequantizer
    reference = hf_logits(hf_model(path.parent, gguf_file=path.name), IDS)
    for backend in ("numba", "onnxruntime"):
        session = edge_runtime.load(out, backend=backend).session()
        prefill = session.forward(IDS[:10], all_logits=True)
        decode = np.stack([session.forward(IDS[i : i + 1]).copy() for i in range(10, len(IDS))])
        assert rel_err(np.concatenate([prefill, decode]), reference) < 1e-4, backend


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_K", "Q6_K"])
def test_gguf_types_read_as_floats_convert_and_match_transformers(gguf_llama, qtype, tmp_path):
    """Types that are not kept as blocks are dequantized by gguf and quantized as floats: unquantized, the
    file's own values give transformers' logits on both backends; by default their linears become E4M3."""
    from test_convert import IDS, hf_model

    path = gguf_llama[qtype]
    default = convert(path, tmp_path / "default.onnx", QuantPolicy())
    storages = {n: t["storage"] for n, t in default.tensors.items() if F.is_linear(n)}
    assert storages.pop(F.EMBED) == "fp16" and set(storages.values()) == {"e4m3"}
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    reference = hf_logits(hf_model(path.parent, gguf_file=path.name), IDS)
    for backend in ("numba", "onnxruntime"):
        logits = edge_runtime.load(out, backend=backend).session().forward(IDS, all_logits=True)
        assert rel_err(logits, reference) < 1e-4, backend
