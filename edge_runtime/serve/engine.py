"""The serving engine: continuous batching over one multi-slot numba session.

One thread (the engine loop, `run`) owns the session and its S sequence slots, each a KV region and a
position. Every step it
  1. drops requests whose client went away (their slots are free again) and ends those past their deadline,
  2. admits queued requests into free slots, choosing the slot whose cached tokens share the longest
     prefix with the prompt (a chat re-sending its history, a fixed system prompt: that KV is reused),
  3. prefills prompts: with nothing decoding, whole pieces of at most `prefill_per_step` tokens; while
     other sequences are decoding, some layers of one piece (`NumbaSession.advance`), as many as take
     about `max_stall` decode steps (measured as it serves; at least one layer of at least ALIGN tokens):
     a long prompt is spread over many steps and a running stream waits for at most one such slice
     between two of its tokens,
  4. runs ONE batched decode step (`decode_batch`) for every sequence past its prompt, and hands each
     sampled token to its request.

An answer does not depend on the traffic beside it, prefill included. Decoding always goes through
`decode_batch`, even for a single sequence: its per-row arithmetic does not depend on the batch. A prompt is
cut into pieces that start at multiples of ALIGN and are at least linear.PREFILL_MIN tokens long, however
many tokens the step has room for: every piece runs the prefill kernels, whose rows do not depend on where the
piece starts or ends (a shorter piece would run the one-token kernels, which round
differently). Prefix reuse keeps the same rule: a slot's cached rows are reused only where a prompt's prefill
computed them (`_Slot.exact`, never a generated reply's rows, which the decode kernels computed), up to a
multiple of ALIGN, leaving a last piece of at least PREFILL_MIN: a prompt's logits are bit-identical whether it
reuses a prefix or not, and whatever ran beside it.

With a PromptCache (prompt_cache.py) the slots' reusable prefixes survive a restart: read into the slots once
the kernels are warm, written when the loop ends.

Requests arrive through `submit` from any thread (the HTTP layer); the engine calls `Request.emit` on its
own thread with one GenerationResponse per token (finish_reason set on the last) or one `Failed`. Nothing
here knows about HTTP.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from hy_edge_format.errors import BudgetError, HyEdgeError
from hy_edge_ops.linear import PREFILL_MIN

from ..text.generate import GenerationResponse, Generator, TextOut, common_prefix, eos_ids_of
from ..text.sampling import LogitsProcessor, Sampler, make_sampler, token_logprobs
from .pieces import ALIGN, MAX_STALL, PieceClock, piece_end, reusable
from .prompt_cache import PromptCache


class QueueFull(HyEdgeError):
    """Every slot is busy and the queue is at its limit: the caller should answer 429 at once."""


class NotAccepting(HyEdgeError):
    """The engine is still loading, or shutting down."""


@dataclass(frozen=True)
class Failed:
    """The request ended without a normal finish (the model failed, the server is stopping)."""

    message: str
    status: int = 500


Event = GenerationResponse | Failed


@dataclass(eq=False)
class Request:
    """One completion request. `emit` is called on the engine thread: it must only hand the event over
    (e.g. `loop.call_soon_threadsafe`)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    sampler: Sampler = field(default_factory=make_sampler)
    processors: Sequence[LogitsProcessor] = ()
    stop: tuple[str, ...] = ()
    submitted: float = field(default_factory=time.perf_counter)  # the TTFT clock: the HTTP layer's arrival
    logprobs: int | None = None  # None: not asked; k: each token's logprob and the k most likely
    # perf_counter time by which it must end (the server's per-request time limit); None: no limit. Past it, it
    # ends at the next step as max_tokens would end it: the text so far, finish_reason "length"
    deadline: float | None = None
    cancelled: bool = False  # set by Engine.cancel (another thread); read at the next step


class Observer:
    """Hooks the engine calls on its thread (metrics); the defaults do nothing."""

    def admitted(self, reused_tokens: int) -> None: ...

    def token(self, first: bool, seconds: float) -> None:
        """A token was sampled: `seconds` since submission (first) or since the previous token."""

    def finished(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        """status: stop | length | timeout (the request's deadline passed) | cancelled | error."""


@dataclass(eq=False)
class _Seq:
    """A request in a slot: prompt tokens still to prefill, then the token to decode next."""

    req: Request
    slot: int
    pending: list[int]  # prompt tokens not yet in the KV cache
    history: list[int]  # prompt + generated tokens (what the logits processors see)
    out: TextOut
    cached: int  # prompt tokens reused from the slot's cache
    next: int | None = None  # sampled, not yet run
    first_at: float = 0.0
    last_at: float = 0.0
    prefill_s: float = 0.0


@dataclass(eq=False)
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what this slot's KV cache holds, position by position
    exact: int = 0  # leading positions whose KV a prompt's aligned prefill pieces computed (reusable as is)
    seq: _Seq | None = None
    last_used: float = 0.0


class Engine:
    """Continuous batching over `session` (a NumbaSession with `slots`, `forward(ids, slot=)` for the warm-up,
    `piece` / `advance` for prompts, `decode_batch`, `truncate(n, slot=)`)."""

    def __init__(
        self,
        session,
        tokenizer,
        eos_ids: Sequence[int] = (),
        *,
        max_queue: int = 8,
        prefill_per_step: int | None = None,
        max_stall: float = MAX_STALL,
        observer: Observer | None = None,
        heartbeat: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        idle_wait: float = 0.5,
        prompt_cache: PromptCache | None = None,
    ):
        if max_queue < 0:
            raise HyEdgeError(f"max queue should be >= 0, got {max_queue}")
        self.session = session
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids_of(session.spec, tokenizer, eos_ids)
        self.max_queue = max_queue
        # the longest piece: one forward() chunk, a multiple of ALIGN, room for a piece and a last one >= PREFILL_MIN
        # (a session whose chunk is shorter than 2 * ALIGN, never `hy-edge serve`'s, splits pieces again: its
        # logits may then depend on the traffic)
        piece = min(prefill_per_step or session.prefill_chunk, session.prefill_chunk)
        self.prefill_per_step = max(2 * ALIGN, piece - piece % ALIGN)
        self.clock = PieceClock(self.prefill_per_step, max_stall)  # how much prefill a step beside streams takes
        self._part = None  # a prompt piece part way through its layers (NumbaSession.piece), and its request
        self._part_seq: _Seq | None = None
        self.observer = observer or Observer()
        self.heartbeat = heartbeat or (lambda: None)  # called every loop iteration (systemd's watchdog)
        self.on_ready = on_ready or (lambda: None)  # called once warm, before the first heartbeat
        self.idle_wait = idle_wait
        self.prompt_cache = prompt_cache  # the slots' prefixes: loaded once warm, saved when the loop ends
        self.ready = threading.Event()
        self.error: BaseException | None = None  # what ended the loop, if not a stop
        self.reused_tokens = 0
        self._slots = [_Slot(i) for i in range(session.slots)]
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._draining = False  # drain or stop was called: no new request will be accepted
        self._thread: threading.Thread | None = None

    # -- what the HTTP layer and the metrics read -------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self._slots)

    @property
    def max_context(self) -> int:
        return self.session.max_context

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def stopping(self) -> bool:
        """No longer accepting for good: draining after SIGTERM, or stopped."""
        return self._draining

    @property
    def active(self) -> int:
        return sum(s.seq is not None for s in self._slots)

    # -- life cycle ---------------------------------------------------------------------------
    def run(self, warmup: bool = True) -> None:
        """Run the loop on the calling thread until `stop`; raises what ended it otherwise. `ready` is set
        once the kernels are warm and requests are accepted.

        Run it on the thread that loaded the model (`hy-edge serve`: the main thread). GNU OpenMP, numba's
        threading layer, keeps one pool of workers per thread that starts parallel regions; with a second
        pool it has more threads than cores and throttles their spin-wait, so every kernel's workers
        sleep and are woken: one stream decoded 35 against 45 tok/s on 2 cores (Hunyuan-0.5B shapes)."""
        self._run(warmup)

    def start(self, warmup: bool = True) -> None:
        """Run the loop on a new thread (tests, tools; see `run` for what a second thread costs)."""
        self._thread = threading.Thread(target=self._run, args=(warmup,), name="hy-edge-engine", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def submit(self, req: Request) -> None:
        """Queue a request (any thread). QueueFull when the queue is at its limit, NotAccepting while
        loading or stopping, BudgetError / HyEdgeError for a prompt that cannot run."""
        P = len(req.prompt_ids)
        if P == 0:
            raise HyEdgeError("the prompt is empty (0 tokens)")
        if P > self.max_context:
            raise BudgetError(f"the prompt has {P} tokens, more than the context length of {self.max_context}")
        if req.max_tokens < 1:
            raise HyEdgeError(f"max_tokens should be >= 1, got {req.max_tokens}")
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is " + ("shutting down" if self.ready.is_set() else "loading"))
            free = sum(s.seq is None for s in self._slots)  # they take queued requests at the next step
            if len(self._queue) >= self.max_queue + free:
                raise QueueFull(f"server busy: {self.slots} sequences running and {self.max_queue} queued")
            self._queue.append(req)
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        """The client went away (any thread): its slot is freed at the next step."""
        req.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to `timeout` s for queued and running requests to finish. True if
        they all did."""
        with self._cond:
            self._accepting, self._draining = False, True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queue and not self.active:
                return True
            time.sleep(0.02)
        return not self._queue and not self.active

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; requests still queued or running get a Failed (503)."""
        with self._cond:
            self._accepting, self._draining = False, True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, warmup: bool) -> None:
        try:
            if warmup:
                self._warmup()
            if self.prompt_cache is not None:  # after the warm-up, which resets the slots
                for slot, tokens in zip(self._slots, self.prompt_cache.load(self.session), strict=False):
                    slot.tokens, slot.exact = tokens, len(tokens)
            with self._cond:
                self._accepting = not self._stopping
            self.ready.set()
            self.on_ready()
            while True:
                self.heartbeat()
                with self._cond:
                    if self._stopping:
                        break
                    if not self._queue and not self.active:
                        self._cond.wait(self.idle_wait)
                        continue
                self.step()
        except BaseException as e:  # a bug in the loop: the server must not hang on it
            self.error = e
            raise
        finally:
            with self._cond:
                self._accepting = False
                pending, self._queue = list(self._queue), collections.deque()
            for req in pending:
                self._emit(req, Failed("the server is shutting down", 503))
            for slot in self._slots:
                if slot.seq is not None:
                    self._finish(slot, "cancelled", Failed("the server is shutting down", 503))
            if self.prompt_cache is not None and self.error is None:  # the most recently used first
                slots = sorted((s for s in self._slots if s.exact >= ALIGN), key=lambda s: -s.last_used)
                self.prompt_cache.save(self.session, [(s.index, s.tokens[: s.exact]) for s in slots])

    def _warmup(self) -> None:
        """Load (or compile) the prefill and batched-decode kernels before the first request."""
        s = self.session
        s.forward(np.zeros(min(8, s.max_context), np.int64), slot=0)
        B = min(s.slots, 4)
        if s.max_context > 8:
            s.decode_batch(np.zeros(B, np.int64), np.arange(B))
        s.reset()

    def step(self) -> None:
        """One round: drop cancelled requests, admit, prefill a bounded chunk, one batched decode."""
        self._reap()
        self._admit()
        self._prefill()
        self._decode()

    def _reap(self) -> None:
        now = time.perf_counter()
        with self._cond:
            gone = [r for r in self._queue if r.cancelled or _late(r, now)]
            for r in gone:
                self._queue.remove(r)
        for r in gone:
            if r.cancelled:
                self.observer.finished("cancelled", len(r.prompt_ids), 0)
            else:  # its time ran out in the queue: an empty answer, ended as a running one is
                self.observer.finished("timeout", len(r.prompt_ids), 0)
                self._emit(r, _ended_in_queue(r, now))
        for slot in self._slots:
            seq = slot.seq
            if seq is not None and seq.req.cancelled:
                self._finish(slot, "cancelled", None)
            elif seq is not None and _late(seq.req, now):  # the text so far, and what the detokenizer holds
                token = seq.history[-1] if seq.out.n else -1
                self._finish(slot, "timeout", self._response(seq, seq.out.end(), token, "length", now))

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if s.seq is None]
            with self._cond:
                if not free or not self._queue:
                    return
                req = self._queue.popleft()
            prompt = req.prompt_ids
            # the slot holding the longest common prefix; among equals, the least recently used
            slot = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
            keep = reusable(slot.tokens, slot.exact, prompt)
            keep = self.session.truncate(keep, slot=slot.index)
            del slot.tokens[keep:]
            slot.exact = min(slot.exact, keep)
            limit = min(req.max_tokens, self.max_context - len(prompt) + 1)  # the last token is never run
            out = TextOut(self.tokenizer, self.eos_ids, req.stop, limit)
            slot.seq = _Seq(req, slot.index, list(prompt[keep:]), list(prompt), out, keep)
            self.reused_tokens += keep
            self.observer.admitted(keep)

    def _prefill(self) -> None:
        """While sequences are decoding: some layers of one prompt piece, about the clock's max_stall decode
        steps' time. Otherwise: whole pieces, up to prefill_per_step tokens (the step's first piece always runs;
        more while they fit). A piece begun is finished before another begins (the oldest request's first)."""
        pending = sorted((s for s in self._slots if s.seq and s.seq.pending), key=lambda s: s.seq.req.submitted)
        if self._part is not None:
            slot = next((s for s in pending if s.seq is self._part_seq), None)
            if slot is None:  # its request ended (_finish: the slot's next request truncates it)
                self._part = self._part_seq = None
            else:
                pending.remove(slot)
                pending.insert(0, slot)
        if any(s.seq is not None and s.seq.next is not None for s in self._slots):
            if pending:
                self._advance(pending[0], self.clock.tokens_for_one_layer(), None)
            return
        budget = step_budget = self.prefill_per_step
        layers = self.session.spec.num_hidden_layers
        for slot in pending:
            if self._part is not None and slot.seq is self._part_seq:
                n = self._part.ids.shape[0]
            else:
                n = piece_end(len(slot.tokens), len(slot.seq.req.prompt_ids), step_budget) - len(slot.tokens)
            if n > budget and budget < step_budget:
                return
            budget -= n
            self._advance(slot, n, layers)

    def _advance(self, slot: _Slot, tokens: int, layers: int | None) -> None:
        """Run `layers` layers (None: as many as the clock allows) of the slot's piece, begun with `tokens`
        tokens (or fewer: `piece_end`) if it has none; once its last layer ran, the piece is in the cache."""
        seq = slot.seq
        try:
            if self._part is None:
                start = len(slot.tokens)
                n = piece_end(start, len(seq.req.prompt_ids), tokens) - start
                self._part, self._part_seq = self.session.piece(np.asarray(seq.pending[:n], np.int64), slot.index), seq
            part = self._part
            n, done = part.ids.shape[0], part.layer
            t0 = time.perf_counter()
            logits = self.session.advance(part, self.clock.layers_for(n) if layers is None else layers)
            seconds = time.perf_counter() - t0
            seq.prefill_s += seconds
            self.clock.sliced(n, part.layer - done, seconds)
            if logits is None:
                return
            self._part = self._part_seq = None
            start = len(slot.tokens)
            slot.tokens += seq.pending[:n]
            del seq.pending[:n]
            if slot.exact == start and n >= PREFILL_MIN:
                slot.exact = start + n
            if not seq.pending:
                self._sample(slot, Generator._finite(logits, 0))
        except Exception as e:  # one request's failure (NaN logits, a bug) must not end the loop
            self._part = self._part_seq = None
            self._fail(slot, e)

    def _decode(self) -> None:
        running = [s for s in self._slots if s.seq is not None and s.seq.next is not None]
        if not running:
            return
        ids = np.array([s.seq.next for s in running], np.int64)
        t0 = time.perf_counter()
        try:
            logits = self.session.decode_batch(ids, np.array([s.index for s in running], np.int64))  # (B, V)
        except Exception as e:
            for slot in running:
                self._fail(slot, e)
            return
        for row, slot in enumerate(running):
            slot.tokens.append(int(ids[row]))
            try:
                self._sample(slot, Generator._finite(logits[row], slot.seq.out.n))
            except Exception as e:
                self._fail(slot, e)
        self.clock.decoded(time.perf_counter() - t0)

    def _sample(self, slot: _Slot, logits: np.ndarray) -> None:
        """Sample the next token of slot's sequence from its logits (V,) and hand it over."""
        seq = slot.seq
        for process in seq.req.processors:
            logits = process(seq.history, logits)
        token = seq.req.sampler(logits)
        logprobs = None if seq.req.logprobs is None else token_logprobs(logits, token, seq.req.logprobs)
        seq.history.append(token)
        now = time.perf_counter()
        first = seq.out.n == 0
        self.observer.token(first, now - (seq.req.submitted if first else seq.last_at))
        if first:
            seq.first_at = now
        seq.last_at = now
        text, finish = seq.out.add(token)
        response = self._response(seq, text, token, finish, now)
        if logprobs is not None:
            response = dataclasses.replace(response, logprobs=logprobs)
        if finish is not None:
            self._finish(slot, finish, response)
        else:
            seq.next = token
            self._emit(seq.req, response)

    @staticmethod
    def _response(seq: _Seq, text: str, token: int, finish: str | None, now: float) -> GenerationResponse:
        P = len(seq.req.prompt_ids)
        return GenerationResponse.timed(
            text, token, finish, P, seq.out.n, seq.cached, start=seq.req.submitted, first=seq.first_at or now,
            prefilled=P - seq.cached, prefill_s=seq.prefill_s, now=now, rss=bool(finish),
        )  # fmt: skip

    def _finish(self, slot: _Slot, status: str, last: Event | None) -> None:
        """The sequence leaves its slot (the slot keeps its KV for prefix reuse)."""
        seq, slot.seq = slot.seq, None
        slot.last_used = time.perf_counter()
        self.observer.finished(status, len(seq.req.prompt_ids), seq.out.n)
        if last is not None:
            self._emit(seq.req, last)

    def _fail(self, slot: _Slot, error: Exception) -> None:
        self.session.truncate(0, slot=slot.index)
        slot.tokens, slot.exact = [], 0
        self._finish(slot, "error", Failed(str(error).splitlines()[0] if str(error) else type(error).__name__))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        if req.cancelled:
            return
        try:
            req.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): treat as a disconnect
            req.cancelled = True


def _late(req: Request, now: float) -> bool:
    return req.deadline is not None and now >= req.deadline


def _ended_in_queue(req: Request, now: float) -> GenerationResponse:
    """The last (and only) response of a request whose deadline passed before it had a slot: no token."""
    P = len(req.prompt_ids)
    return GenerationResponse.timed(
        "", -1, "length", P, 0, 0, start=req.submitted, first=now, prefilled=0, prefill_s=0.0, now=now, rss=False
    )
