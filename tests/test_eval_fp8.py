"""bench/eval_fp8.py: its metric functions on small exact inputs, and its per-variant pipeline on a
tiny GGUF checkpoint (no download: the checkpoint is written by tests/checkpoints.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("eval_fp8", ROOT / "bench" / "eval_fp8.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_windows_predict_every_token_once(ev):
    assert ev.windows(10, 4) == [(0, 4), (3, 7), (6, 10)]
    assert ev.windows(1, 512) == []
    assert ev.windows(2, 512) == [(0, 2)]
    for n, size in [(1030, 512), (513, 512), (512, 512), (7, 2)]:
        spans = ev.windows(n, size)
        targets = [t for s, e in spans for t in range(s + 1, e)]
        assert targets == list(range(1, n))
        assert all(e - s <= size for s, e in spans)
    with pytest.raises(ValueError, match="size"):
        ev.windows(10, 1)


def test_token_nll_and_perplexity_from_known_logits(ev):
    # uniform over 4 tokens: nll = log 4 whatever the target; perplexity 4
    nll = ev.token_nll(np.zeros((3, 4), np.float32), np.array([0, 1, 3]))
    np.testing.assert_allclose(nll, [math.log(4)] * 3, rtol=1e-12)
    assert ev.perplexity(nll) == pytest.approx(4.0, rel=1e-12)
    # p = (0.5, 0.25, 0.25) from logits log p (+ a shift, which softmax ignores)
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])) + 100.0
    nll = ev.token_nll(logits, np.array([0, 1]))
    np.testing.assert_allclose(nll, [math.log(2), math.log(4)], rtol=1e-9)
    assert ev.perplexity(nll) == pytest.approx(math.sqrt(8), rel=1e-9)
    with pytest.raises(ValueError, match="targets"):
        ev.token_nll(np.zeros((3, 4)), np.array([0, 1]))


def test_agreement(ev):
    assert ev.agreement(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    assert ev.agreement([7], [7]) == 1.0
    with pytest.raises(ValueError):
        ev.agreement([1, 2], [1])


def test_rouge_l_wiring(ev):
    assert ev.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert ev.rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS "the cat the mat" = 4 of 6 reference and 4 of 5 prediction words: F1 = 2PR/(P+R)
    p, r = 4 / 5, 4 / 6
    assert ev.rouge_l("the cat on the mat", "the cat sat upon the mat") == pytest.approx(2 * p * r / (p + r))
    assert ev.rouge_l("Cats running", "cat runs") == 1.0  # the Porter stemmer is on
    assert ev.rouge_l("", "") == 1.0 and ev.rouge_l("", "words") == 0.0
    assert ev.mean_rouge_l(["a b", "c"], ["a b", "d"]) == 0.5
    assert ev.relative_change(0.297, 0.3) == pytest.approx(-0.01)


def test_weight_errors(ev):
    tensors = {
        "a": {"storage": "e4m3", "rel_error": 0.02},
        "b": {"storage": "e5m2", "rel_error": 0.06},
        "n": {"storage": "fp32", "rel_error": 0.0},
        "e": {"storage": "fp16", "rel_error": 1e-4},
    }
    mean, worst, counts = ev.weight_errors(tensors)
    assert (mean, worst) == (pytest.approx(0.04), 0.06)
    assert counts == {"e4m3": 1, "e5m2": 1, "fp16": 1, "fp32": 1}
    assert ev.weight_errors({"n": {"storage": "fp32", "rel_error": 0.0}})[:2] == (0.0, 0.0)


def test_committed_eval_set(ev):
    words = len((ev.EVAL_DIR / "text.txt").read_text().split())
    assert 1200 <= words <= 1800
    prompts = ev.load_prompts(ev.EVAL_DIR / "prompts.jsonl")
    assert len(prompts) == 12 and all(p["prompt"].strip() and p["reference"].strip() for p in prompts)


def test_table_formats(ev):
    row = {
        "variant": "e4m3/channel",
        "file_mb": 166.7,
        "weight_rel_error_mean": 0.0263,
        "weight_rel_error_max": 0.0265,
        "perplexity": 28.7,
        "perplexity_ratio": 1.0155,
        "greedy_agreement": 0.9239,
        "rougeL_vs_fp32": 0.761,
        "identical_generations": 5,
        "rougeL_vs_reference": 0.304,
        "rougeL_vs_reference_change": 0.051,
    }
    md = ev.format_table([row], 12, markdown=True).splitlines()
    assert len(md) == 3 and md[0].startswith("| variant") and md[1].startswith("|---|")
    assert "| 92.39% |" in md[2] and "| 5/12 |" in md[2] and "+5.1%" in md[2]
    assert len(ev.format_table([row], 12).splitlines()) == 2


def test_pipeline_on_tiny_gguf(ev, tmp_path):
    """convert_cached → run_variant → score on a tiny Llama GGUF: fp32 against itself is exact, an
    FP8 variant scores in range, and a second call reuses the file its recorded policy matches."""
    import checkpoints as ck  # the test extras (rouge_score) and the runtime must import: no skip

    gguf = ck.make_gguf_llama(tmp_path / "tiny" / "tiny.gguf", "Q8_0", num_hidden_layers=1)
    out = tmp_path / "out"
    text = "The lighthouse bell rang twice, then paused. " * 3
    prompts = ["Hello!", "Name a season."]
    runs = {}
    for v in (ev.REFERENCE, ev.Variant("e5m2/block:32", "e5m2", "block:32")):
        path, tensors = ev.convert_cached(gguf, out, v)
        runs[v.name] = ev.run_variant(path, text, prompts, max_tokens=4, window=24, tensors=tensors)
    ref = runs["fp32"]
    assert ref.nll.size == ref.argmax.size > 24 and len(ref.generations) == 2
    same = ev.score("fp32", ref, ref, ref.generations)  # its own generations as the references
    assert same["perplexity_ratio"] == 1.0 and same["greedy_agreement"] == 1.0
    assert same["rougeL_vs_fp32"] == same["rougeL_vs_reference"] == 1.0
    assert same["rougeL_vs_reference_change"] == 0.0 and same["identical_generations"] == 2
    row = ev.score("e5m2/block:32", runs["e5m2/block:32"], ref, ["Hi.", "Spring."])
    assert 0.5 < row["perplexity_ratio"] < 2.0
    # top-1 agreement is the share of positions whose argmax both runs share: recomputed here, and an
    # FP8 copy of the same weights agrees on most of them
    expected = float(np.mean(runs["e5m2/block:32"].argmax == ref.argmax))
    assert row["greedy_agreement"] == pytest.approx(expected) and expected > 0.5
    assert row["storage"].get("e5m2", 0) > 0 and 0.0 < row["weight_rel_error_mean"] <= row["weight_rel_error_max"]
    json.dumps(row)  # what --json writes

    # cached: same file reused (not rewritten); a different policy in the file's metadata is not reused
    path = out / ev.REFERENCE.filename
    mtime = path.stat().st_mtime_ns
    assert ev.convert_cached(gguf, out, ev.REFERENCE)[0] == path and path.stat().st_mtime_ns == mtime
    quant, source = ev.recorded(path)
    assert not ev.policy_matches(quant, source, ev.Variant("x", "e4m3").policy(), gguf.resolve())
    assert not ev.policy_matches(quant, source, ev.REFERENCE.policy(), tmp_path / "other.gguf")
