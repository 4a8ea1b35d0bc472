"""Session mechanics on the numba backend: cache continuity, chunked prefill, truncation, budget,
allocation-free decode, and the model file checks of load()."""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import onnx
import onnx_edit
import pytest
from hy_edge_format import format as F
from hy_edge_format.errors import BudgetError, ModelFileError
from runtime_helpers import PROMPT_IDS, allocations, cached_bytes_per_token, converted, make_seed_checkpoint

import edge_runtime
from edge_runtime.engine.memory import ContextLimited


@pytest.fixture(scope="module")
def hy_fp8(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3")


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    src = make_seed_checkpoint(
        tmp_path_factory.mktemp("seed_conv"), layer_types=["dwconv", "attention", "dwconv", "attention"]
    )
    return converted(src, "e4m3")


@pytest.mark.parametrize("which", ["hy_fp8", "conv_model"])
def test_prefill_decode_chunked_and_token_by_token_agree(which, request):
    model = edge_runtime.load(request.getfixturevalue(which))
    ids = np.asarray(PROMPT_IDS)
    one_shot = model.session(prefill_chunk=64).forward(ids, all_logits=True)
    chunked = model.session(prefill_chunk=5).forward(ids, all_logits=True)
    s = model.session(prefill_chunk=64)
    stepwise = np.stack([s.forward(ids[i : i + 1]).copy() for i in range(len(ids))])
    s = model.session(prefill_chunk=64)
    s.forward(ids[:11])
    tail = np.stack([s.forward(ids[i : i + 1]).copy() for i in range(11, len(ids))])
    np.testing.assert_allclose(chunked, one_shot, rtol=0, atol=1e-5)
    np.testing.assert_allclose(stepwise, one_shot, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tail, one_shot[11:], rtol=0, atol=1e-5)
    assert s.n_cached == len(ids)


@pytest.mark.parametrize("which", ["hy_fp8", "conv_model"])
@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_a_prompt_last_layer_runs_on_its_last_row_only(which, chunk, request):
    # forward() without all_logits runs the last layer past its KV write on the last row of the last chunk
    # alone: the same logits as when every row is computed, and the same cache (the next token agrees)
    model = edge_runtime.load(request.getfixturevalue(which))
    ids = np.asarray(PROMPT_IDS)
    every_row = model.session(prefill_chunk=chunk).forward(ids, all_logits=True)
    ort = model.session("onnxruntime").forward(ids, all_logits=True)
    s = model.session(prefill_chunk=chunk)
    last = s.forward(ids[:-1]).copy()
    np.testing.assert_allclose(last, every_row[-2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(last, ort[-2], rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.forward(ids[-1:]), every_row[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["hy_fp8", "conv_model"])
def test_truncate_then_continue_equals_fresh(which, request):
    model = edge_runtime.load(request.getfixturevalue(which))
    ids = np.asarray(PROMPT_IDS)
    other = np.asarray([3, 4, 5, 6, 7, 8])
    fresh = model.session().forward(np.concatenate([ids[:9], other]), all_logits=True)[9:]
    s = model.session(prefill_chunk=4)
    s.forward(ids)
    assert s.truncate(9) == 9 and s.n_cached == 9
    np.testing.assert_allclose(s.forward(other, all_logits=True), fresh, rtol=0, atol=1e-5)
    s.reset()
    assert s.n_cached == 0
    np.testing.assert_allclose(
        s.forward(ids[:9], all_logits=True), model.session().forward(ids[:9], all_logits=True), rtol=0, atol=1e-6
    )


def test_decode_step_allocates_no_arrays(tmp_path):
    # hidden size 1024: one hidden-state row (4 KB) is larger than the Python objects (views, kernel
    # dispatch) a decode step creates, so a freed temporary array of any activation stands out
    src = make_seed_checkpoint(tmp_path / "wide", hidden_size=1024, intermediate_size=256, num_hidden_layers=2)
    # threads given: with the default, the thread governor reads /proc/stat every 0.5 s, and a step slow
    # enough (emulated aarch64) catches that read's buffer inside the traced window
    s = edge_runtime.load(converted(src, "e4m3"), threads=2).session()
    row = s.spec.hidden_size * 4
    s.forward(np.asarray(PROMPT_IDS))
    s.forward(np.asarray([5]))  # warm: every kernel compiled / loaded
    ids = np.asarray([6])
    tracemalloc.start()
    try:
        s.forward(ids)  # once under tracing, so anything cached on first use is already there
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()  # the peak sees a temporary that forward() frees before returning
        s.forward(ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < row, peak - base  # no array of even one hidden row appears in a decode step, kept or freed


def test_context_limit_and_budget(hy_fp8):
    model = edge_runtime.load(hy_fp8)
    s = model.session(max_context=16)
    assert s.max_context == 16
    with pytest.raises(BudgetError):
        s.forward(np.arange(17) % 300)
    with pytest.raises(BudgetError):  # more than the model's max_position_embeddings (256)
        model.session(max_context=10_000)
    plan = s.plan
    budget = plan.total(100)
    with pytest.warns(ContextLimited, match="allows a context of 100 tokens"):
        assert model.session(max_memory=budget).max_context == 100  # what the budget allows
    with pytest.raises(BudgetError, match="allows a context of 100"):
        model.session(max_memory=budget, max_context=200)
    with pytest.raises(BudgetError):
        model.session(max_memory=plan.weights)


@pytest.mark.parametrize(("which", "kv_cache"), [("hy_fp8", "fp32"), ("hy_fp8", "fp8"), ("conv_model", "fp16")])
def test_a_session_allocates_what_its_plan_says(which, kv_cache, request, monkeypatch):
    # measured as it happens (runtime_helpers.allocations): numpy's buffers through tracemalloc, the
    # caches' anonymous mappings as Python's mmap makes them
    model = edge_runtime.load(request.getfixturevalue(which), kv_cache=kv_cache)
    model.session(max_context=16)  # kernels loaded: nothing first-use is left for the windows below
    got, plans = {}, {}
    for context in (64, 256):
        with allocations(monkeypatch) as got[context]:
            s = model.session(max_context=context)
        plans[context] = s.plan.fixed + context * s.plan.per_token
    # all of it, within the few KB of arrays beside the buffers (the linears' private copies of their
    # scales: 6-8 KB on these models)
    for context in got:
        assert plans[context] <= got[context].total < plans[context] + 16 * 1024, (context, got[context], plans)
    # what grows with the context: the plan's per-token bytes (the same code runs: the rest cancels) ...
    grown = got[256].total - got[64].total
    assert abs(grown - 192 * s.plan.per_token) < 4096, (grown, s.plan.per_token)
    # ... of which the caches the spec implies, every byte mapped lazily (zero pages until written)
    assert got[256].mapped - got[64].mapped == 192 * cached_bytes_per_token(model.spec, kv_cache)


def test_weights_are_memory_mapped_views(hy_fp8):
    model = edge_runtime.load(hy_fp8)
    q = model.weights.layers[0].q_proj
    assert q.storage == "e4m3" and q.w.dtype == np.uint8 and not q.w.flags.writeable
    base = q.w
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


# -- load() rejects bad files with one line -------------------------------------------------------


def _copy(src, dst_dir):
    shutil.copy(src, dst_dir / "model.onnx")
    shutil.copy(str(src) + ".data", dst_dir / "model.onnx.data")
    return dst_dir / "model.onnx"


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_and_corrupt_files(hy_fp8, tmp_path):
    with pytest.raises(ModelFileError) as e:
        edge_runtime.load(tmp_path / "nope.onnx")
    assert "not found" in _one_line(e)
    (tmp_path / "junk.onnx").write_bytes(b"\x07garbage that is not protobuf" * 10)
    with pytest.raises(ModelFileError):
        edge_runtime.load(tmp_path / "junk.onnx")
    path = _copy(hy_fp8, tmp_path)
    with open(tmp_path / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelFileError) as e:
        edge_runtime.load(path)
    assert "truncated" in _one_line(e)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ModelFileError) as e:
        edge_runtime.load(path)
    assert "external data file not found" in _one_line(e)


def _edit(hy_fp8, tmp_path, edit):
    proto = onnx.load(str(hy_fp8), load_external_data=False)
    edit(proto)
    shutil.copy(str(hy_fp8) + ".data", tmp_path / "model.onnx.data")
    return onnx_edit.save(proto, tmp_path / "model.onnx")  # as a converter would have written it


def test_missing_tensor_wrong_shape_wrong_version(hy_fp8, tmp_path):
    victim = "model.layers.1.mlp.up_proj.weight" + F.QWEIGHT

    def drop(p):
        keep = [t for t in p.graph.initializer if t.name != victim]
        del p.graph.initializer[:]
        p.graph.initializer.extend(keep)

    with pytest.raises(ModelFileError, match="model.layers.1.mlp.up_proj.weight' is missing") as e:
        edge_runtime.load(_edit(hy_fp8, tmp_path, drop))
    _one_line(e)

    def reshape(p):
        t = next(t for t in p.graph.initializer if t.name == victim)
        t.dims[:] = [t.dims[1], t.dims[0]]

    with pytest.raises(ModelFileError, match="has shape"):
        edge_runtime.load(_edit(hy_fp8, tmp_path, reshape))

    def version(p):
        next(m for m in p.metadata_props if m.key == F.META_FORMAT).value = "99"

    with pytest.raises(ModelFileError, match="format version 99"):
        edge_runtime.load(_edit(hy_fp8, tmp_path, version))
