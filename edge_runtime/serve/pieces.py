"""Where a served prompt's prefill pieces start and end, and how much of a piece a step runs (engine.py).

A piece starts at a multiple of ALIGN and is at least PREFILL_MIN tokens long, so that it runs the prefill
kernels, whose rows do not depend on where the piece starts or ends nor on how its layers are spread over
steps: a prompt's logits are the same bits however it is cut. With nothing decoding, a step runs whole
pieces. Beside running streams it runs some layers of one piece, about `max_stall` decode steps' time:
`PieceClock` keeps the moving averages that say how long those are (a batched decode step; one prompt
token through one layer) and sizes a new piece so that one of its layers fits in that time.
"""

from __future__ import annotations

from hy_edge_ops.linear import PREFILL_MIN

from ..text.generate import common_prefix

MAX_STALL = 0.8  # a prompt's slice beside running streams: about this many decode steps' time (--prefill-stall)
ALIGN = 16  # where a prompt piece may start: a multiple of the prefill kernel's token vectors (4, 8 or 16)


def piece_end(start: int, end: int, budget: int) -> int:
    """Where the piece of a prompt from `start` (a multiple of ALIGN) to its `end` stops: at most `budget` (a
    multiple of ALIGN) tokens later, on a multiple of ALIGN, never leaving a last piece < PREFILL_MIN (the
    piece then takes the rest: up to ALIGN + PREFILL_MIN - 1 tokens past `budget`)."""
    stop = start + budget
    if stop >= end:
        return end
    if end - stop < PREFILL_MIN:
        stop = (end - PREFILL_MIN) - (end - PREFILL_MIN) % ALIGN
        return stop if stop > start else end
    return stop


def reusable(cached: list[int], exact: int, prompt: list[int]) -> int:
    """The positions of a slot holding `cached` (its first `exact` computed by prompts' prefills) that
    `prompt` may reuse: shared, computed by a prefill, a multiple of ALIGN, and leaving at least PREFILL_MIN
    tokens to prefill (so that the prompt's pieces are the ones it has alone)."""
    keep = min(common_prefix(cached, prompt), exact, len(prompt) - PREFILL_MIN)
    return max(0, keep - keep % ALIGN)


class PieceClock:
    """How much prefill a step beside running streams takes: moving averages of a batched decode step and of
    one prompt token through one layer, measured as the engine serves."""

    def __init__(self, prefill_per_step: int, max_stall: float = MAX_STALL):
        self.prefill_per_step = prefill_per_step  # the longest piece (a multiple of ALIGN)
        self.max_stall = max_stall
        self.step_s = 0.0
        self.layer_s = self.layer_last = 0.0  # the average, and the last slice's

    @staticmethod
    def _average(mean: float, sample: float) -> float:
        return sample if mean <= 0.0 else 0.8 * mean + 0.2 * sample

    def decoded(self, seconds: float) -> None:
        """A batched decode step took `seconds`."""
        self.step_s = self._average(self.step_s, seconds)

    def sliced(self, tokens: int, layers: int, seconds: float) -> None:
        """`layers` layers of a `tokens`-token piece took `seconds` (a piece under ALIGN tokens is not
        counted: its time is mostly fixed costs)."""
        if tokens >= ALIGN and layers > 0:
            self.layer_last = seconds / (tokens * layers)
            self.layer_s = self._average(self.layer_s, self.layer_last)

    def layers_for(self, tokens: int) -> int:
        """Layers of a `tokens`-token piece to run in one step beside running streams: about max_stall decode
        steps' time (at least one layer)."""
        if self.layer_s <= 0.0:  # nothing measured yet: one layer
            return 1
        return max(1, int(self.max_stall * self.step_s / (tokens * self.layer_s)))

    def tokens_for_one_layer(self) -> int:
        """The tokens of a new piece beside running streams: as many as one layer runs in about max_stall
        decode steps' time (a multiple of ALIGN, at least ALIGN, at most prefill_per_step); then `layers_for`
        runs as many of its layers in a step as that time allows. A token-layer costs more as the prompt goes
        on (attention reads more keys): sized by the last slice's cost where it was higher than the average."""
        if self.layer_s <= 0.0:
            return ALIGN
        n = int(self.max_stall * self.step_s / max(self.layer_s, self.layer_last))
        return max(ALIGN, min(self.prefill_per_step, n - n % ALIGN))
