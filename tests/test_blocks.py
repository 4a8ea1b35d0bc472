"""Block-integer weights (GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K kept exactly): the
kernels against numpy and against gguf's own dequantizer, the stored weights against gguf's dequantizer,
and the converted model against transformers on both backends."""

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

STORAGE = {
    "Q8_0": "int8", "Q4_0": "uint4", "Q4_1": "uint4", "Q5_0": "int5", "Q5_1": "uint5",
    "Q4_K": "q4k", "Q5_K": "q5k", "Q6_K": "q6k",
}  # fmt: skip
# where a GGUF block holds its half scales (ggml-common.h)
HALVES = {"Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


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


@pytest.mark.parametrize("qtype", list(HALVES))
def test_gguf_block_kernels_match_gguf_dequantizer(qtype):
    """Random GGUF blocks (any codes and sub-scales, scales of both signs) carried into the file's storage:
    numpy's decode and every kernel give gguf's own dequantized weights (decoded rows bit for bit)."""
    import gguf
    from hy_edge_convert.quantize import GGUF_BLOCKS, carry_blocks

    rng = np.random.default_rng(3)
    per_block, nbytes = GGUF_BLOCKS[qtype.lower()]
    n_rows, k_dim = 37, 512
    raw = rng.integers(0, 256, (n_rows, k_dim // per_block, nbytes), dtype=np.uint8)
    for at in HALVES[qtype]:
        halves = rng.uniform(-0.02, 0.02, (n_rows, k_dim // per_block, 1)).astype(np.float16)
        raw[:, :, at : at + 2] = halves.view(np.uint8)
    raw = raw.reshape(n_rows, -1)
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(n_rows, k_dim)
    q = carry_blocks(qtype.lower(), raw, (n_rows, k_dim))
    assert q.storage == STORAGE[qtype]
    codes = q.data.reshape(n_rows, -1)
    parts = {
        "scales": q.scale.view(np.uint16),
        "offsets": None if q.offset is None else q.offset.view(np.uint16),
        **dict(zip(("sub_scales", "sub_offsets"), q.subs, strict=False)),
    }
    decoded = blockq.dequantize(q.storage, codes, *parts.values())
    assert np.array_equal(decoded, weights)
    ids = np.array([5, 0, 36, 5], np.int64)
    rows = np.empty((4, k_dim), np.float32)
    halves = blockq.pack_scales(q.storage, *parts.values()).view(np.uint16)
    blockq.decode_rows(blockq.code_view(np.ascontiguousarray(codes[ids]), q.storage), halves, ids, rows)
    assert np.array_equal(rows, weights[ids])  # an embedding's rows
    x = rng.standard_normal((9, k_dim)).astype(np.float32)
    ref = x.astype(np.float64) @ weights.T.astype(np.float64)
    one = np.stack(
        [linear.matmul_blocks(x[t], codes, q.storage, out=np.empty(n_rows, np.float32), **parts) for t in range(9)]
    )
    for T in (1, 2, 3, 9):  # one-token, grouped and prefill kernels
        out = linear.matmul_blocks(x[:T], codes, q.storage, out=np.empty((T, n_rows), np.float32), **parts)
        assert rel_err(out, ref[:T]) < 1e-6, T
        batched = linear.matmul_blocks(
            x[:T], codes, q.storage, out=np.empty((T, n_rows), np.float32), batched=True, **parts
        )
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


TIED = ("Q4_1", "Q5_1", "Q4_K")  # a tied head reads the kept embedding; its rows have offsets


@pytest.mark.parametrize("qtype", list(STORAGE))
def test_gguf_blocks_kept_exactly_and_match_transformers(qtype, tmp_path):
    from hy_edge_convert.checkpoint import open_checkpoint
    from test_convert import IDS, hf_model

    path = ck.make_gguf_llama(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, tie=qtype in TIED)
    out = tmp_path / "model.onnx"
    report = convert(path, out, QuantPolicy())  # the default: blocks kept
    linears = {n: t for n, t in report.tensors.items() if F.is_linear(n)}
    assert {t["storage"] for t in linears.values()} == {STORAGE[qtype]}
    assert (F.LM_HEAD not in report.tensors) == (qtype in TIED)
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
    """Asked for a format, kept types are dequantized by gguf and quantized as floats: unquantized, the
    file's own values give transformers' logits on both backends; `--format e4m3` makes their linears E4M3."""
    from test_convert import IDS, hf_model

    path = gguf_llama[qtype]
    e4m3 = convert(path, tmp_path / "e4m3.onnx", QuantPolicy(format="e4m3", rounding="nearest"))
    storages = {n: t["storage"] for n, t in e4m3.tensors.items() if F.is_linear(n)}
    assert storages.pop(F.EMBED) == "fp16" and set(storages.values()) == {"e4m3"}
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    reference = hf_logits(hf_model(path.parent, gguf_file=path.name), IDS)
    for backend in ("numba", "onnxruntime"):
        logits = edge_runtime.load(out, backend=backend).session().forward(IDS, all_logits=True)
        assert rel_err(logits, reference) < 1e-4, backend
