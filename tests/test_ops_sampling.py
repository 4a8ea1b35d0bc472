import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.sampling import (
    apply_repetition_penalty,
    argmax,
    min_p_mask,
    sample_categorical,
    softmax,
    top_k_mask,
    top_p_mask,
)

P = np.array([0.05, 0.5, 0.15, 0.3])  # deliberately unsorted


def logits():
    return np.log(P).astype(np.float32)


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


def test_softmax():
    np.testing.assert_allclose(softmax(logits()), P, rtol=1e-6)
    x = np.array([1000.0, -np.inf, 1000.0], np.float32)
    np.testing.assert_array_equal(softmax(x), [0.5, 0.0, 0.5])


def test_top_k():
    assert kept(top_k_mask(logits(), 3)) == {1, 2, 3}
    assert kept(top_k_mask(logits(), 1)) == {1}
    assert kept(top_k_mask(logits(), 0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("p,expect", [(0.8, {1, 3}), (0.81, {1, 2, 3}), (0.5, {1}), (0.1, {1}), (1.0, {0, 1, 2, 3})])
def test_top_p(p, expect):
    assert kept(top_p_mask(logits(), p)) == expect


def test_top_p_large_vocab_matches_full_sort():
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(120818) * 3).astype(np.float32)
    for p in (0.5, 0.9, 0.999):
        keep = ref.top_p_keep(ref.softmax(x), p)
        assert kept(top_p_mask(x.copy(), p)) == set(np.flatnonzero(keep).tolist())


def test_min_p():
    assert kept(min_p_mask(logits(), 0.4)) == {1, 3}  # keeps prob >= 0.2
    assert kept(min_p_mask(logits(), 0.3)) == {1, 2, 3}  # 0.15 == 0.3 * 0.5 kept
    assert kept(min_p_mask(logits(), 1.0)) == {1}


def test_repetition_penalty():
    x = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    apply_repetition_penalty(x, np.array([0, 1, 1, 0], np.int64), 2.0)  # each id once
    np.testing.assert_array_equal(x, [1.0, -4.0, 1.0, 0.5])


@pytest.mark.parametrize(
    "u,idx", [(0.0, 0), (0.049, 0), (0.051, 1), (0.549, 1), (0.551, 2), (0.69, 2), (0.71, 3), (0.999999, 3)]
)
def test_sample_categorical(u, idx):
    assert sample_categorical(P, u) == idx


def test_sample_skips_zero_probability():
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert sample_categorical(probs, 0.0) == 1
    assert sample_categorical(probs, 0.5) == 3
    assert sample_categorical(probs, 0.9999999999) == 3


def test_argmax():
    assert argmax(logits()) == 1
