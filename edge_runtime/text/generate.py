"""Generation: prefill → decode loop → sampler → a stream of response objects (mlx-lm's
stream_generate shape; phase names from gpt-fast).

The Generator owns one backend session (numba or onnxruntime, see backend.py) and remembers which
tokens its cache holds, so a prompt that extends them (the next chat turn) prefills only the new
tokens, and a diverging one truncates to the common prefix.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from hy_edge_format.errors import BudgetError, HyEdgeError, ModelFileError

from ..engine.backend import Backend
from ..engine.memory import peak_rss_mb
from .sampling import LogitsProcessor, Sampler, TokenLogprobs, make_sampler
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token. Stats are running values; on the last response (finish_reason set)
    they are final."""

    text: str  # text that became final with this token ('' while held back)
    token: int
    finish_reason: str | None  # None | "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the cache, not prefilled again
    ttft_s: float  # request start → first token sampled
    prefill_tps: float  # prefilled tokens / prefill time
    decode_tps: float  # tokens after the first / time since the first
    peak_rss_mb: float
    logprobs: TokenLogprobs | None = None  # set only when the request asked for them (the server's logprobs)

    @classmethod
    def timed(
        cls,
        text: str,
        token: int,
        finish: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        *,
        start: float,
        first: float,
        prefilled: int,
        prefill_s: float,
        now: float,
        rss: bool = True,
    ) -> GenerationResponse:
        """A response whose rates come from the clock: `start` the request, `first` the first token
        sampled, `now` this token (perf_counter seconds); `rss` reads the peak RSS (a /proc read)."""
        n, decode_s = completion_tokens, now - first
        return cls(
            text=text,
            token=int(token),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=n,
            cached_tokens=cached_tokens,
            ttft_s=first - start,
            prefill_tps=prefilled / prefill_s if prefill_s > 0 else 0.0,
            decode_tps=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            peak_rss_mb=peak_rss_mb() if rss else 0.0,
        )


@dataclass
class GenerationResult:
    """Everything a non-streaming call returns (the CLI's --json object)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    peak_rss_mb: float
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "text",
                "token_ids",
                "prompt_tokens",
                "completion_tokens",
                "finish_reason",
                "ttft_s",
                "prefill_tps",
                "decode_tps",
                "peak_rss_mb",
            )
        }


def collect(responses: Iterable[GenerationResponse]) -> GenerationResult:
    text, ids, last = [], [], None
    for r in responses:
        text.append(r.text)
        ids.append(r.token)
        last = r
    if last is None:
        raise HyEdgeError("no tokens were generated")
    return GenerationResult(
        "".join(text),
        ids,
        last.prompt_tokens,
        last.completion_tokens,
        last.finish_reason or "length",
        last.ttft_s,
        last.prefill_tps,
        last.decode_tps,
        last.peak_rss_mb,
        last.cached_tokens,
    )


@dataclass
class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may still become one."""

    stops: tuple[str, ...]
    pending: str = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """New text → (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextOut:
    """One sequence's text, token by token: detokenizes, stops at an EOS id (no text), a stop string
    (text cut before it) or the `limit`-th token ("length"). Shared by the Generator and the server's
    engine loop, so both end a sequence the same way."""

    def __init__(self, tokenizer: Tokenizer | None, eos_ids: Iterable[int], stop: Sequence[str], limit: int):
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.stopper = StopMatcher(tuple(s for s in stop if s))
        self.eos_ids = frozenset(eos_ids)
        self.limit = limit
        self.n = 0  # tokens added

    def add(self, token: int) -> tuple[str, str | None]:
        """Token → (text that became final with it, finish reason or None)."""
        self.n += 1
        if token in self.eos_ids:
            return self._final(), "stop"
        text, hit = self.stopper.feed(self.detok.add(token) if self.detok else "")
        if hit:
            return text, "stop"
        if self.n >= self.limit:
            return text + self._final(), "length"
        return text, None

    def end(self) -> str:
        """The sequence ends here for another reason (a time limit): the text still held back."""
        return self._final()

    def _final(self) -> str:
        """End of stream: what the detokenizer and the stop matcher still hold (a stop string in it
        still cuts)."""
        more, hit = self.stopper.feed(self.detok.flush() if self.detok else "")
        return more if hit else more + self.stopper.flush()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0
    prefilled: int = 0
    first: float | None = None  # when the first token was sampled


def eos_ids_of(spec, tokenizer: Tokenizer | None, extra: Iterable[int] = ()) -> frozenset[int]:
    """Token ids that end a generation: the caller's, the spec's and the tokenizer's."""
    eos = set(extra) | set(spec.eos_token_id)
    if tokenizer is not None:
        eos |= set(tokenizer.eos_ids)
    return frozenset(eos)


class Generator:
    """Generation over one backend session, reusing its cache across calls."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None, eos_ids: Iterable[int] = ()):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids_of(backend.spec, tokenizer, eos_ids)
        self.tokens: list[int] = []  # what the backend's cache holds, position by position
        self.reused = 0  # prompt tokens the last prefill took from the cache
        self._one = np.zeros(1, np.int64)  # (1,) the decode step's input

    # -- phases -----------------------------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Bring the cache to `prompt_ids`, reusing the longest cached prefix (at least one token is
        run, for its logits); returns the last prompt token's logits (V,)."""
        if self.backend.n_cached != len(self.tokens):  # someone else used the session
            self.backend.reset()
            self.tokens = []
        keep = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        if keep < self.backend.n_cached:
            self.backend.truncate(keep)
            keep = self.backend.n_cached  # a backend may keep less (OrtSession restarts conv models)
            del self.tokens[keep:]
        self.reused = keep
        chunk = getattr(self.backend, "prefill_chunk", None) or len(prompt_ids)
        logits = None
        for s in range(keep, len(prompt_ids), chunk):
            ids = list(prompt_ids[s : s + chunk])
            logits = self.backend.forward(np.asarray(ids, np.int64))
            self.tokens += ids
        return logits

    def decode_one_token(self, token: int) -> np.ndarray:
        """Run one sampled token; returns its logits (V,)."""
        self._one[0] = token
        logits = self.backend.forward(self._one)
        self.tokens.append(int(token))
        return logits

    def reset(self) -> None:
        self.backend.reset()
        self.tokens = []

    # -- the loop -----------------------------------------------------------------------------
    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int = 256,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        stop: Sequence[str] = (),
    ) -> Iterator[GenerationResponse]:
        """Yield one GenerationResponse per generated token. Stops at an EOS id (the EOS token is
        the last response, with no text), a stop string (text cut before it), `max_tokens`, or a
        full context (finish_reason "length")."""
        prompt_ids = [int(t) for t in prompt_ids]
        P, S = len(prompt_ids), self.backend.max_context
        if P == 0:
            raise HyEdgeError("the prompt is empty (0 tokens)")
        if P > S:
            raise BudgetError(f"the prompt has {P} tokens, more than the context length of {S}")
        if max_tokens < 1:
            raise HyEdgeError(f"max tokens should be >= 1, got {max_tokens}")
        sampler = sampler or make_sampler()
        limit = min(max_tokens, S - P + 1)  # the last token is sampled, never run
        out = TextOut(self.tokenizer, self.eos_ids, stop, limit)
        clock = _Clock()

        logits = self._finite(self.prefill(prompt_ids), 0)
        cached = self.reused
        clock.prefill_s, clock.prefilled = time.perf_counter() - clock.start, P - cached
        history = list(prompt_ids)
        for n in range(1, limit + 1):
            for process in logits_processors:
                logits = process(history, logits)
            token = sampler(logits)
            history.append(token)
            if clock.first is None:
                clock.first = time.perf_counter()
            text, finish = out.add(token)
            yield self._response(text, token, finish, P, n, cached, clock)
            if finish is not None:
                return
            logits = self._finite(self.decode_one_token(token), n)

    @staticmethod
    def _finite(logits: np.ndarray, n: int) -> np.ndarray:
        """NaN or Inf logits would sample token 0 forever: stop with the likely cause instead. One sum
        over V floats per token (an overflow to Inf needs |logits| ~ 1e33, never a real model's)."""
        if not np.isfinite(logits.sum(dtype=np.float32)):
            where = "the prompt" if n == 0 else f"generated token {n}"
            raise ModelFileError(
                f"the model produced NaN/Inf logits after {where}: its weights are probably corrupt "
                "(check them with `hy-edge info --verify MODEL`, or convert again)"
            )
        return logits

    @staticmethod
    def _response(
        text: str, token: int, finish: str | None, P: int, n: int, cached: int, clock: _Clock
    ) -> GenerationResponse:
        return GenerationResponse.timed(
            text, token, finish, P, n, cached, start=clock.start, first=clock.first,
            prefilled=clock.prefilled, prefill_s=clock.prefill_s, now=time.perf_counter(),
        )  # fmt: skip


def stream_generate(
    backend: Backend, tokenizer: Tokenizer | None, prompt_ids: Sequence[int], **kwargs
) -> Iterator[GenerationResponse]:
    """One-off generation on `backend` (no cache reuse across calls: use a Generator for that)."""
    return Generator(backend, tokenizer).stream(prompt_ids, **kwargs)
