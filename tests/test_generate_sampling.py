"""Samplers on exact small probability vectors (transformers' warper semantics), stop strings."""

from __future__ import annotations

import numpy as np
import pytest
from hy_edge_format.errors import HyEdgeError

from edge_runtime.text.generate import StopMatcher, common_prefix
from edge_runtime.text.sampling import filtered_probs, make_logits_processors, make_openai_penalties, make_sampler

P = np.array([0.05, 0.5, 0.15, 0.3], np.float64)
LOGITS = np.log(P).astype(np.float32)


def probs(**kw) -> np.ndarray:
    return filtered_probs(LOGITS.copy(), kw.pop("temperature", 1.0), **kw).astype(np.float64)


def test_plain_softmax_recovers_the_distribution():
    np.testing.assert_allclose(probs(), P, atol=1e-6)


def test_temperature():
    expected = P**2 / (P**2).sum()  # logits / 0.5
    np.testing.assert_allclose(probs(temperature=0.5), expected, atol=1e-6)


def test_top_k():
    np.testing.assert_allclose(probs(top_k=2), [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # ascending cumsum 0.05, 0.20, 0.50, 1.0: tokens with cumsum <= 1 - 0.75 go
    np.testing.assert_allclose(probs(top_p=0.75), [0, 0.625, 0, 0.375], atol=1e-6)
    np.testing.assert_allclose(probs(top_p=0.9), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=1e-6)
    # the top token always survives
    np.testing.assert_allclose(probs(top_p=0.01), [0, 1, 0, 0], atol=1e-6)


def test_min_p_is_relative_to_the_top_token():
    # threshold 0.4 * 0.5 = 0.2: 0.05 and 0.15 go
    np.testing.assert_allclose(probs(min_p=0.4), [0, 0.625, 0, 0.375], atol=1e-6)


def test_greedy_is_argmax():
    assert make_sampler(0.0)(LOGITS.copy()) == 1


def test_draws_follow_the_distribution_and_the_seed():
    sampler = make_sampler(1.0, seed=123)
    draws = np.array([sampler(LOGITS.copy()) for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, P, atol=0.03)
    again = make_sampler(1.0, seed=123)
    assert [again(LOGITS.copy()) for _ in range(50)] == draws[:50].tolist()
    other = make_sampler(1.0, seed=124)
    assert [other(LOGITS.copy()) for _ in range(50)] != draws[:50].tolist()


def test_filtered_tokens_are_never_drawn():
    sampler = make_sampler(1.0, top_k=2, seed=0)
    assert {sampler(LOGITS.copy()) for _ in range(300)} == {1, 3}


def test_repetition_penalty_as_transformers():
    (proc,) = make_logits_processors(2.0)
    out = proc([0, 1, 1], np.array([2.0, -2.0, 1.0], np.float32))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    assert make_logits_processors(1.0) == []


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(top_k=-1)]
)
def test_bad_options_are_user_errors(kw):
    with pytest.raises(HyEdgeError):
        make_sampler(**kw)
    with pytest.raises(HyEdgeError):
        make_logits_processors(0.0)


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(("STOP", "\n\n"))
    assert m.feed("Hello S") == ("Hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("ar") == ("STar", False)
    assert m.feed(" x\n") == (" x", False)
    assert m.feed("\nmore") == ("", True)
    m = StopMatcher(("STOP",))
    assert m.feed("abSTOPcd") == ("ab", True)
    m = StopMatcher(("STOP",))
    assert m.feed("abST") == ("ab", False)
    assert m.flush() == "ST"


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_openai_penalties_count_generated_tokens_only():
    assert make_openai_penalties(3) == []
    (penalize,) = make_openai_penalties(3, frequency_penalty=0.5, presence_penalty=0.25)
    tokens = [1, 1, 3] + [2, 2, 2, 0]  # a prompt of 3 tokens, then 4 generated
    out = penalize(tokens, np.zeros(4, np.float32))
    np.testing.assert_array_equal(out, [-0.75, 0.0, -1.75, 0.0])  # count * 0.5 + 0.25; prompt tokens untouched
    with pytest.raises(HyEdgeError, match="presence_penalty"):
        make_openai_penalties(0, presence_penalty=3.0)
