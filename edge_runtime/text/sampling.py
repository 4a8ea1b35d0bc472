"""Samplers and logits processors (mlx-lm's sample_utils shape): `make_sampler(...)` returns a
function logits (V,) -> token id; `make_logits_processors(...)` returns functions
(tokens, logits) -> logits applied before it.

Order and semantics follow transformers' generate: repetition penalty, then temperature, top-k,
top-p, min-p, softmax, one categorical draw. A seed fixes the draws: same seed, same logits ⇒ same
tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from hy_edge_format.errors import HyEdgeError
from hy_edge_ops import sampling as ops

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


# Ranges in which the float32 arithmetic of the sampler stays finite: logits (|l| < 1e4) divided by the
# temperature or the repetition penalty. A temperature of 1e-39 is a float32 subnormal: l / T overflowed to
# inf, the softmax to NaN, and the draw failed with a traceback.
TEMPERATURE_RANGE = (1e-6, 1e6)  # or 0: greedy
PENALTY_RANGE = (1e-3, 1e3)


def check_options(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0
) -> None:
    """HyEdgeError (one line) for a value a user typed wrong."""
    low, high = TEMPERATURE_RANGE
    if temperature != 0 and not low <= temperature <= high:  # NaN fails both
        raise HyEdgeError(f"temperature should be 0 (greedy) or in [{low:g}, {high:g}], got {temperature}")
    if top_k < 0:
        raise HyEdgeError(f"top-k should be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise HyEdgeError(f"top-p should be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise HyEdgeError(f"min-p should be in [0, 1], got {min_p}")
    low, high = PENALTY_RANGE
    if not low <= repetition_penalty <= high:
        raise HyEdgeError(f"repetition penalty should be in [{low:g}, {high:g}], got {repetition_penalty}")


def filtered_probs(
    logits: np.ndarray,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """The distribution a sampler draws from: softmax of the temperature-scaled logits with the
    tokens top-k / top-p / min-p remove set to probability 0 (float64). Masks in `work` (V,) if given."""
    work = np.empty(logits.shape, np.float32) if work is None else work
    np.divide(logits, np.float32(temperature), out=work)
    if 0 < top_k < work.shape[0]:
        ops.top_k_mask(work, top_k)
    if top_p < 1.0:
        ops.top_p_mask(work, top_p)
    if min_p > 0.0:
        ops.min_p_mask(work, min_p)
    return ops.softmax(work)  # f64 (V,)


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None
) -> Sampler:
    """temperature 0 → greedy (argmax); otherwise a categorical draw from `filtered_probs`, driven by
    a PCG64 stream seeded with `seed` (fresh entropy when None or -1, llama.cpp's "random seed")."""
    check_options(temperature, top_k, top_p, min_p)
    if seed is not None and seed < 0:
        if seed != -1:
            raise HyEdgeError(f"seed should be >= 0 (or -1 for a random seed), got {seed}")
        seed = None
    if temperature == 0:
        return lambda logits: int(ops.argmax(logits))
    rng = np.random.Generator(np.random.PCG64(seed))
    work: list[np.ndarray] = []  # one (V,) buffer, made on the first call

    def sample(logits: np.ndarray) -> int:
        if not work or work[0].shape != logits.shape:
            work[:] = [np.empty(logits.shape, np.float32)]
        probs = filtered_probs(logits, temperature, top_k, top_p, min_p, work[0])
        return int(ops.sample_categorical(probs, rng.random()))

    return sample


def make_logits_processors(repetition_penalty: float = 1.0) -> list[LogitsProcessor]:
    """transformers' RepetitionPenaltyLogitsProcessor over the prompt and the tokens generated so
    far: a seen token's logit is divided by the penalty when positive, multiplied when negative."""
    check_options(repetition_penalty=repetition_penalty)
    if repetition_penalty == 1.0:
        return []

    def penalize(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        ops.apply_repetition_penalty(logits, np.asarray(tokens, np.int64), repetition_penalty)
        return logits

    return [penalize]


def make_openai_penalties(
    prompt_tokens: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0
) -> list[LogitsProcessor]:
    """OpenAI's frequency and presence penalties, over the generated tokens only (not the prompt):
    logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty."""
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -2.0 <= value <= 2.0:
            raise HyEdgeError(f"{name} should be in [-2, 2], got {value}")
    if frequency_penalty == 0.0 and presence_penalty == 0.0:
        return []

    def penalize(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        generated = np.asarray(tokens[prompt_tokens:], np.int64)
        if generated.size:
            ids, counts = np.unique(generated, return_counts=True)
            logits[ids] -= (counts * frequency_penalty + presence_penalty).astype(np.float32)
        return logits

    return [penalize]


LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token in practice, +100 all but forces it


def make_logit_bias(bias: Mapping[int, float], vocab_size: int) -> list[LogitsProcessor]:
    """OpenAI's logit_bias: a fixed value added to the logits of the given token ids, before sampling."""
    if not bias:
        return []
    for token, value in bias.items():
        if not 0 <= token < vocab_size:
            raise HyEdgeError(f"logit_bias: token id {token} is not in the vocabulary (0..{vocab_size - 1})")
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:  # NaN fails both
            raise HyEdgeError(f"logit_bias: the bias of token {token} should be in [-100, 100], got {value}")
    ids = np.fromiter(bias.keys(), np.int64, len(bias))
    values = np.fromiter(bias.values(), np.float32, len(bias))

    def add_bias(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        logits[ids] += values
        return logits

    return [add_bias]


@dataclass(frozen=True)
class TokenLogprobs:
    """log-probability of the sampled token and of the `top` most likely ones (id, logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprobs:
    """Log-softmax of `logits` (V,) at `token` and its `top` largest entries, in float64. These are the
    model's probabilities after the logits processors (penalties, logit_bias) and before temperature,
    top-k/p and min-p (what OpenAI and vLLM report). Only requests that ask pay for it: numpy on one row."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, x.shape[0])
        ids = np.argpartition(-x, k - 1)[:k]
        ids = ids[np.lexsort((ids, -x[ids]))]  # most likely first; ties by id
        best = tuple((int(i), float(x[i] - lse)) for i in ids)
    return TokenLogprobs(int(token), float(x[token] - lse), best)
