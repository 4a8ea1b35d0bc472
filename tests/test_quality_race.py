"""The quality race's figures (bench/quality_metrics.py, bench/quality_report.py, the speed join in
bench/quality_race.py) on tiny inputs, against independent computations: plain-Python KL sums, sorted order
statistics, and the byte counts of the arrays written into a tiny GGUF and ONNX file. llama.cpp and the race
itself are not run here."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.append(str(BENCH))  # bench/ is scripts, not a package; appended so nothing here shadows tests
    try:
        yield {name: importlib.import_module(name) for name in ("quality_metrics", "quality_report", "quality_race")}
    finally:
        sys.path.remove(str(BENCH))


def test_log_probs_and_kl_against_plain_sums(bench):
    qm = bench["quality_metrics"]
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 3, (4, 7)).astype(np.float32)
    logits = ref_logits + rng.normal(0, 0.5, (4, 7)).astype(np.float32)
    ref_lp, lp = qm.log_probs(ref_logits), qm.log_probs(logits)
    for t in range(4):
        z = [math.exp(float(x)) for x in ref_logits[t]]
        p = [v / sum(z) for v in z]
        zq = [math.exp(float(x)) for x in logits[t]]
        q = [v / sum(zq) for v in zq]
        np.testing.assert_allclose(np.exp(ref_lp[t]), p, rtol=1e-12)
        expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert qm.kl_divergence(ref_lp, lp)[t] == pytest.approx(expected, rel=1e-9)
    # softmax ignores a shift; a distribution is at KL 0 from itself, and KL is not symmetric
    np.testing.assert_allclose(qm.log_probs(ref_logits.astype(np.float64) + 50.0), ref_lp, atol=1e-9)
    assert np.all(qm.kl_divergence(ref_lp, ref_lp) == 0.0)
    assert not np.allclose(qm.kl_divergence(ref_lp, lp), qm.kl_divergence(lp, ref_lp))
    with pytest.raises(ValueError, match="shapes"):
        qm.kl_divergence(ref_lp, lp[:2])


def test_percentile_perplexity_ratio_and_tally(bench):
    qm = bench["quality_metrics"]
    # 1..100: the 99th percentile lies 0.01 of the way from the 99th to the 100th order statistic
    assert qm.percentile(np.arange(100, 0, -1), 99) == pytest.approx(99.01)
    assert qm.percentile([5.0], 99) == 5.0
    # PPL = exp(mean nll): nll log 2 against log 4 is PPL 2 against 4
    assert qm.perplexity_ratio([math.log(2)] * 3, [math.log(4)] * 3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        qm.perplexity_ratio([1.0], [1.0, 2.0])

    # two windows of 2 positions over a 3-token vocabulary
    ref_lp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    lp = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]]))
    targets = np.array([0, 1, 1, 2])
    ref, var = qm.Tally(), qm.Tally()
    for s in (0, 2):
        ref.add(ref_lp[s : s + 2], targets[s : s + 2], ref_lp[s : s + 2])
        var.add(lp[s : s + 2], targets[s : s + 2], ref_lp[s : s + 2])
    row = var.summary(ref)
    probs = zip(np.exp(ref_lp).tolist(), np.exp(lp).tolist(), strict=True)
    kl = [sum(p * math.log(p / q) for p, q in zip(a, b, strict=True)) for a, b in probs]
    assert row["tokens"] == 4
    assert row["kl_mean"] == pytest.approx(np.mean(kl)) and row["kl_max"] == pytest.approx(max(kl))
    assert row["top1_agreement"] == 0.75  # argmax 1 vs 0 at the first position only
    nll, ref_nll = [-lp[i, t] for i, t in enumerate(targets)], [-ref_lp[i, t] for i, t in enumerate(targets)]
    assert row["perplexity_ratio"] == pytest.approx(math.exp(np.mean(nll)) / math.exp(np.mean(ref_nll)))
    assert ref.summary(ref)["kl_mean"] == 0.0 and ref.summary(ref)["perplexity_ratio"] == 1.0


def _gguf(path: Path, tied: bool) -> int:
    """A tiny llama-shaped GGUF; returns the bytes a decode step reads, counted from the arrays written."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(1)
    embd = gguf.quants.quantize(rng.normal(size=(16, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    q = gguf.quants.quantize(rng.normal(size=(64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    norm = rng.normal(size=64).astype(np.float32)
    w.add_tensor("token_embd.weight", embd, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("output_norm.weight", norm)
    read = q.nbytes + norm.nbytes
    if tied:
        read += embd.nbytes  # the output matrix
    else:
        out = rng.normal(size=(16, 64)).astype(np.float16)
        w.add_tensor("output.weight", out)
        read += out.nbytes  # token_embd only gives one row per token
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read


def test_gguf_bytes_per_token(bench, tmp_path):
    qm = bench["quality_metrics"]
    for tied in (True, False):
        path = tmp_path / f"tied{tied}.gguf"
        expected = _gguf(path, tied)
        assert qm.gguf_bytes_per_token(path) == expected
        assert qm.file_bytes(path) == path.stat().st_size > expected


def _onnx(path: Path, head: bool) -> int:
    """Initializers in external data as a converted file has them; returns the bytes a decode step reads."""
    import onnx
    from onnx import helper, numpy_helper

    embed = np.ones((16, 8), np.float16)
    codes, scale = np.ones((8, 8), np.uint8), np.ones(8, np.float32)
    inits = [
        numpy_helper.from_array(embed, "model.embed_tokens.weight"),
        numpy_helper.from_array(codes, "model.layers.0.mlp.up_proj.weight"),
        numpy_helper.from_array(scale, "model.layers.0.mlp.up_proj.weight_scale"),
    ]
    read = codes.nbytes + scale.nbytes
    if head:
        inits.append(numpy_helper.from_array(np.ones((16, 8), np.uint8), "lm_head.weight"))
        read += 16 * 8
    else:
        read += embed.nbytes  # tied: the embedding is the head
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], inits)  # fmt: skip
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)  # fmt: skip
    return read


def test_onnx_bytes_per_token(bench, tmp_path):
    qm = bench["quality_metrics"]
    for head in (True, False):
        path = tmp_path / f"head{head}.onnx"
        expected = _onnx(path, head)
        assert qm.onnx_bytes_per_token(path) == expected
        assert qm.file_bytes(path) == path.stat().st_size + path.with_name(path.name + ".data").stat().st_size


def test_variants_are_policies(bench):
    qr = bench["quality_race"]
    from hy_edge_convert import QuantPolicy

    for v in (qr.REFERENCE, *qr.HY_EDGE):
        QuantPolicy(**v.policy_kwargs)  # every hy-edge variant is a valid converter policy
    assert qr.hy_edge("x", granularity="block:32").policy_kwargs == {"granularity": "block:32"}
    names = [v.name for v in qr.VARIANTS]
    assert len(names) == len(set(names))
    assert {v.ftype for v in qr.LLAMA_CPP} == {None, *qr.LLAMA_CPP_TYPES}


def test_speed_join_and_table(bench, tmp_path):
    qr, report = bench["quality_race"], bench["quality_report"]
    runs = {"hy-edge": [{"decode_tps": t} for t in (100.0, 120.0, 90.0)], "llama.cpp Q8_0": [{"decode_tps": 80.0}],
            "hy-edge e4m3": [{"decode_tps": 70.0}]}  # fmt: skip
    (tmp_path / "smollm2-avx2.json").write_text(json.dumps({"isa": "avx2", "runs": runs}))
    (tmp_path / "smollm2-broken.json").write_text("{}")
    assert qr.decode_speeds(tmp_path) == {"avx2": {"hy-edge": 100.0, "llama.cpp Q8_0": 80.0, "hy-edge e4m3": 70.0}}
    # a record from before the converter kept GGUF blocks: its "hy-edge" rows were E4M3 conversions
    old = {"isa": "avx512", "runs": {"hy-edge": [{"decode_tps": 1.0}], "hy-edge block:32": [{"decode_tps": 2.0}],
                                     "llama.cpp Q8_0": [{"decode_tps": 3.0}]}}  # fmt: skip
    assert qr.speed_row_names(old) == {"hy-edge": "hy-edge e4m3", "hy-edge block:32": "hy-edge e4m3 block:32",
                                       "llama.cpp Q8_0": "llama.cpp Q8_0"}  # fmt: skip
    assert qr.speed_row_names({**old, "hy_edge_default_format": "source"})["hy-edge"] == "hy-edge"
    (tmp_path / "smollm2-avx512.json").write_text(json.dumps(old))
    assert qr.decode_speeds(tmp_path)["avx512"] == {"hy-edge e4m3": 1.0, "hy-edge e4m3 block:32": 2.0,
                                                    "llama.cpp Q8_0": 3.0}  # fmt: skip
    renamed = qr.renamed_speed_rows(tmp_path)
    assert renamed == {"avx512": {"hy-edge": "hy-edge e4m3", "hy-edge block:32": "hy-edge e4m3 block:32"}}
    speeds = {v.speed for v in qr.VARIANTS if v.speed}  # joined on the row names bench/smollm2.py writes
    assert {"hy-edge", "hy-edge e4m3", "hy-edge e4m3 block:32", "llama.cpp Q4_1 (the bundled file)"} <= speeds

    row = {"variant": "hy-edge default", "runtime": "hy-edge", "mb_per_token": 135.42, "file_mb": 215.8,
           "perplexity_ratio": 1.03321, "kl_mean": 0.02874, "kl_p99": 0.1283, "top1_agreement": 0.8863,
           "decode_tps": {"avx2": 100.0}}  # fmt: skip
    doc = {"date": "d", "cpu": "c", "model": "m.gguf", "text": "t.txt", "text_tokens": 10, "predicted_tokens": 9,
           "window": 512, "reference": {"variant": "fp32", "perplexity": 30.5, "mb_per_token": 538.0},
           "speed_results": {"avx2": "bench/results/smollm2-avx2.json"}, "speed_rows_renamed": renamed,
           "rows": [row, {**row, "variant": "llama.cpp Q6_K", "runtime": "llama.cpp", "decode_tps": {}}]}  # fmt: skip
    lines = report.markdown(doc).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| variant |") and table[0].endswith("| decode tok/s avx2 |")
    assert table[2] == "| hy-edge default | 135.4 | 215.8 | 1.0332 | 0.0287 | 0.1283 | 88.63% | 100.0 |"
    assert table[3].endswith("| 88.63% |  |")  # no speed-race row: left empty
    assert lines[-1] == (
        "smollm2-avx512.json was recorded before --format source became the default: its 'hy-edge' row measured "
        "what the speed race now calls 'hy-edge e4m3', its 'hy-edge block:32' row measured what the speed race now "
        "calls 'hy-edge e4m3 block:32'."
    )


def _window_logits(path: Path, chunk: np.ndarray) -> np.ndarray:
    """A window's (T, V) logits from a model loaded afresh: no state a runner could carry between windows."""
    import edge_runtime

    return edge_runtime.load(path, threads=1).session(max_context=16).forward(chunk, all_logits=True)


def test_race_on_a_tiny_model(bench, gguf_llama, tmp_path, monkeypatch):
    """The race's plumbing end to end on a tiny GGUF: converted once per policy, windows stitched so every
    token after the first is predicted once, the runner's cache reset between windows, and the figures equal
    torch's log_softmax / KL on logits computed window by window from fresh loads."""
    torch = pytest.importorskip("torch")
    qr = bench["quality_race"]
    monkeypatch.setattr(qr, "OUT", tmp_path)
    src = gguf_llama["Q4_1"]
    ref_path = qr.hy_edge_model(src, qr.REFERENCE)
    mtime = ref_path.stat().st_mtime_ns
    assert qr.hy_edge_model(src, qr.REFERENCE) == ref_path and ref_path.stat().st_mtime_ns == mtime  # cached
    var_path = qr.hy_edge_model(src, qr.hy_edge("e4m3", format="e4m3", granularity="channel"))
    assert var_path != ref_path and (var_path.parent / (var_path.name + ".policy.json")).is_file()

    ref = qr.HyEdgeRunner(ref_path, 1, 8)
    n_vocab = ref.model.spec.vocab_size
    ids = np.random.default_rng(3).integers(0, n_vocab, 30).astype(np.int64)
    runners = {"again": qr.HyEdgeRunner(ref_path, 1, 8), "e4m3": qr.HyEdgeRunner(var_path, 1, 8)}
    ref_tally, tallies = qr.race(ids, ref, runners, window=8)

    spans = [(0, 8), (7, 15), (14, 22), (21, 29), (28, 30)]
    targets = np.concatenate([ids[s + 1 : e] for s, e in spans])
    np.testing.assert_array_equal(targets, ids[1:])  # each token after the first predicted exactly once
    want = {}
    for name, path in (("ref", ref_path), ("e4m3", var_path)):
        lp = torch.cat([
            torch.log_softmax(torch.from_numpy(_window_logits(path, ids[s:e])[:-1]).double(), dim=-1)
            for s, e in spans
        ])  # fmt: skip
        want[name] = lp
    kl = torch.nn.functional.kl_div(want["e4m3"], want["ref"], log_target=True, reduction="none").sum(-1)
    tgt = torch.from_numpy(targets)
    for name, tally in (("ref", ref_tally), ("e4m3", tallies["e4m3"])):
        nll = -want[name].gather(1, tgt[:, None])[:, 0]
        np.testing.assert_allclose(np.concatenate(tally.nll), nll.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate(tally.argmax), want[name].argmax(-1).numpy())
    np.testing.assert_allclose(np.concatenate(tallies["e4m3"].kl), kl.numpy(), rtol=1e-4, atol=1e-9)

    row = tallies["e4m3"].summary(ref_tally)
    assert row["tokens"] == 29 and row["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4) and row["kl_mean"] > 0
    same = tallies["again"].summary(ref_tally)  # the reference's own file: the same numbers
    assert same["kl_max"] == 0.0 and same["perplexity_ratio"] == 1.0 and same["top1_agreement"] == 1.0


def test_llama_cpp_sees_the_same_model(bench, gguf_llama, tmp_path, monkeypatch):
    """llama.cpp's runner and quantizer on a tiny GGUF: its F32 requantization of the file and hy-edge's fp32
    conversion of it give the same distributions on the same token ids (what lets the race compare the two
    runtimes' variants against one reference); its Q8_0 reads fewer bytes and moves the distribution a little."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-bench)")
    qr, qm = bench["quality_race"], bench["quality_metrics"]
    monkeypatch.setattr(qr, "OUT", tmp_path)
    src = gguf_llama["Q8_0"]
    f32 = qr.llama_cpp_model(src, qr.Variant("llama.cpp F32", "llama.cpp", ftype="F32"))
    q8 = qr.llama_cpp_model(src, qr.Variant("llama.cpp Q8_0", "llama.cpp", ftype="Q8_0"))
    assert qr.llama_cpp_model(src, qr.Variant("as it is", "llama.cpp")) == src
    assert qm.gguf_bytes_per_token(q8) < qm.gguf_bytes_per_token(f32)

    ref = qr.HyEdgeRunner(qr.hy_edge_model(src, qr.REFERENCE), 1, 8)
    ids = np.random.default_rng(4).integers(0, ref.model.spec.vocab_size, 20).astype(np.int64)
    runners = {"f32": qr.LlamaCppRunner(f32, 1, 8), "q8": qr.LlamaCppRunner(q8, 1, 8)}
    ref_tally, tallies = qr.race(ids, ref, runners, window=8)
    same, q8_row = tallies["f32"].summary(ref_tally), tallies["q8"].summary(ref_tally)
    assert same["tokens"] == 19 and same["kl_max"] < 1e-6 and same["top1_agreement"] == 1.0
    assert same["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)  # float sums in another order
    assert q8_row["kl_mean"] > same["kl_mean"]
