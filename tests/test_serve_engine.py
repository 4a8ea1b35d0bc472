"""The serving engine's continuous batching on a tiny model, without HTTP: answers do not depend on the
traffic beside them, long prompts are prefilled between decode steps, prefixes are reused, cancelled and
rejected requests leave nothing behind."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from hy_edge_format.errors import BudgetError
from runtime_helpers import converted
from serve_helpers import seconds

import edge_runtime
from edge_runtime.serve.engine import ALIGN, PREFILL_MIN, Engine, Failed, NotAccepting, Observer, QueueFull, Request
from edge_runtime.text.generate import GenerationResponse

TIMEOUT = seconds(60)


@pytest.fixture(scope="module")
def model(llama_dir):
    return edge_runtime.load(converted(llama_dir, "e4m3"), threads=1)


@pytest.fixture
def make_engine(model):
    engines = []

    def make(slots=4, max_context=128, **kwargs):
        engine = Engine(model.session(slots=slots, max_context=max_context), model.tokenizer, **kwargs)
        engine.start()
        assert engine.ready.wait(TIMEOUT)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


class Collector:
    """A request's events, in a thread-safe queue (as the HTTP layer hands them to its event loop)."""

    def __init__(self, prompt, max_tokens, **kwargs):
        self.events: queue.Queue = queue.Queue()
        self.request = Request(list(prompt), max_tokens, self.events.put, **kwargs)

    def result(self) -> tuple[list[int], str, GenerationResponse | Failed]:
        tokens = []
        while True:
            ev = self.events.get(timeout=TIMEOUT)
            if isinstance(ev, Failed):
                return tokens, "failed", ev
            tokens.append(ev.token)
            if ev.finish_reason:
                return tokens, ev.finish_reason, ev


def prompts(model) -> list[list[int]]:
    texts = ["Hello there", "Numbers like 2024 appear in text " * 3, "def main():", "café " * 9, "x"]
    return [model.encode_prompt(t) for t in texts]


def run_one(engine, prompt, max_tokens):
    c = Collector(prompt, max_tokens)
    engine.submit(c.request)
    return c.result()


def test_concurrent_answers_equal_sequential_ones_and_the_generator(model, make_engine):
    ps, lengths = prompts(model), [9, 14, 5, 20, 11]
    engine = make_engine(slots=3, max_queue=8)
    sequential = [run_one(engine, p, n)[0] for p, n in zip(ps, lengths, strict=True)]
    concurrent = [Collector(p, n) for p, n in zip(ps, lengths, strict=True)]
    for c in concurrent:  # 5 requests on 3 slots: two wait in the queue, then join the running batch
        engine.submit(c.request)
    assert [c.result()[0] for c in concurrent] == sequential
    for p, n, tokens in zip(ps, lengths, sequential, strict=True):
        assert len(tokens) == n or tokens[-1] in engine.eos_ids
        assert model.generate(p, max_tokens=n).token_ids == tokens  # the one-sequence path, token for token
    assert engine.active == 0 and engine.queued == 0


def test_a_long_prompt_is_prefilled_between_decode_steps(model, make_engine):
    engine = make_engine(slots=2, prefill_per_step=32)
    engine.eos_ids = frozenset()  # random weights may sample EOS: the running stream must keep going
    running = Collector(model.encode_prompt("Hello"), 60)
    engine.submit(running.request)
    first = running.events.get(timeout=TIMEOUT)
    assert isinstance(first, GenerationResponse)
    long = Collector(model.encode_prompt("Numbers like 2024 and 3.14159 appear in text " * 3), 2)
    engine.submit(long.request)
    P = len(long.request.prompt_ids)
    assert P > 64
    first_long = long.events.get(timeout=TIMEOUT)
    # meanwhile, the running stream advanced once per step: one step per piece of <= 32 prompt tokens
    assert running.events.qsize() >= -(-P // 32) - 2
    assert first_long.ttft_s > 0
    running.result(), long.result()


class PieceCalls:
    """The session with each prompt piece's calls kept -- (its first token ids, tokens, layers run) -- and,
    with `delay`, every prompt token held back that many seconds a layer (scaled on an emulated machine: the
    ratio to a decode step stays)."""

    def __init__(self, session, delay: float = 0.0):
        self._session, self.delay, self.calls = session, delay, []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def advance(self, piece, layers):
        before = piece.layer
        time.sleep(self.delay * len(piece.ids) * (min(self.spec.num_hidden_layers, before + layers) - before))
        logits = self._session.advance(piece, layers)
        self.calls.append((tuple(piece.ids[:4].tolist()), len(piece.ids), piece.layer - before))
        return logits


def test_beside_running_streams_a_prompt_is_prefilled_a_few_layers_at_a_time(model):
    session = PieceCalls(model.session(slots=2, max_context=256), delay=seconds(0.01))
    L = model.spec.num_hidden_layers
    assert L >= 2
    engine = Engine(session, model.tokenizer, prefill_per_step=128, max_stall=2.0)
    engine.start(warmup=False)
    try:
        assert engine.ready.wait(TIMEOUT)
        engine.eos_ids = frozenset()
        first = model.encode_prompt("Numbers like 2024 and 3.14159 appear in text " * 3)
        run_one(engine, first, 1)
        assert [c[1:] for c in session.calls] == [
            (len(first), L)
        ]  # nothing decoding: one piece through every layer at once
        running = Collector(model.encode_prompt("Hello"), 400)
        engine.submit(running.request)
        running.events.get(timeout=TIMEOUT)
        session.calls.clear()
        second = model.encode_prompt("Other words, 1999 and 2.71828, in a text " * 3)
        before = running.events.qsize()
        run_one(engine, second, 1)
        # a layer of a prompt piece costs far more than two decode steps of this tiny model: the smallest
        # pieces, one layer a step, and the running stream decoded a token after each of those steps
        assert sum(n * k for _, n, k in session.calls) == len(second) * L
        assert all(k == 1 for _, _, k in session.calls)
        assert [n for _, n, _ in session.calls[:-L]] == [ALIGN] * (len(session.calls) - L)
        assert session.calls[-1][1] < ALIGN + PREFILL_MIN  # the rest, never a piece under PREFILL_MIN
        assert running.events.qsize() - before >= len(session.calls) - 1
        engine.cancel(running.request)
    finally:
        engine.stop()


class Recorder:
    """A logits processor that keeps a copy of every row of logits it is given (V,), then passes them on."""

    def __init__(self):
        self.rows: list[np.ndarray] = []

    def __call__(self, tokens, logits):
        self.rows.append(logits.copy())
        return logits


def test_a_prompts_logits_do_not_depend_on_the_traffic_or_on_prefix_reuse(model, make_engine):
    engine = make_engine(slots=4, max_context=256, prefill_per_step=128)  # alone: pieces of 128
    engine.eos_ids = frozenset()
    text = "Numbers like 2024 and 3.14159 appear in text "
    prompt = model.encode_prompt(text * 5)  # alone: pieces of 128 and the rest; beside others: of 32
    assert len(prompt) > 128

    def logits_of(others=()) -> tuple[list[np.ndarray], GenerationResponse]:
        recorder = Recorder()
        c = Collector(prompt, 4, processors=[recorder])
        for o in others:  # submitted first: the prompt shares its steps' prefill budget with them
            engine.submit(o.request)
        engine.submit(c.request)
        tokens, _, last = c.result()
        for o in others:
            o.result()
        return recorder.rows, last

    alone, _ = logits_of()
    engine.stop()
    engine = make_engine(slots=4, max_context=256, prefill_per_step=32)  # cold slots, pieces of 32
    engine.eos_ids = frozenset()
    others = [Collector(model.encode_prompt(t), 6) for t in ("Hello there, " * 7, "x", "café " * 5)]
    loaded, first = logits_of(others=others)
    assert first.cached_tokens == 0
    again, second = logits_of()  # its own prompt's rows are cached: reused
    assert second.cached_tokens > 0
    for rows in (loaded, again):
        assert len(rows) == len(alone) == 4
        for got, want in zip(rows, alone, strict=True):
            assert np.array_equal(got, want)  # bit for bit, the first token's (prefill) and the decoded ones


def test_a_prompts_logits_alone_equal_them_beside_three_others_arriving_at_random_times(model):
    # whatever runs beside it -- others decoding while its pieces go through a few layers a step, others'
    # pieces in between, arrivals at any step -- a prompt's logits are the same bits as alone
    text = "Numbers like 2024 and 3.14159 appear in text "
    prompt = model.encode_prompt(text * 5)
    assert len(prompt) > 128
    L = model.spec.num_hidden_layers
    other_texts = ("Hello there, " * 9, "x", "café " * 12, "def main():\n    return 0\n" * 6)
    rng = np.random.default_rng(11)
    alone, sliced = None, 0
    for trial in range(4):  # alone, then three times beside others
        session = PieceCalls(model.session(slots=4, max_context=256))
        engine = Engine(session, model.tokenizer)
        engine.start()
        try:
            assert engine.ready.wait(TIMEOUT)
            engine.eos_ids = frozenset()
            recorder = Recorder()
            mine = Collector(prompt, 6, processors=[recorder])
            others = [Collector(model.encode_prompt(other_texts[(trial + i) % 4]), int(rng.integers(60, 100)))
                      for i in range(3 if trial else 0)]  # fmt: skip
            # the others first, at random within 5 ms; this prompt at random while they decode
            times = [*rng.uniform(0, seconds(0.005), len(others)), rng.uniform(seconds(0.005), seconds(0.03))]
            arrivals = sorted(zip(times, [*others, mine], strict=True), key=lambda a: a[0])
            t0 = time.perf_counter()
            for at, c in arrivals:
                time.sleep(max(0.0, t0 + at - time.perf_counter()))
                engine.submit(c.request)
            for c in (mine, *others):
                assert c.result()[1] == "length"
        finally:
            engine.stop()
        if alone is None:
            alone = recorder.rows
            assert all(k == L for _, _, k in session.calls)  # nothing beside it: every piece at once
            continue
        mine_starts = (tuple(prompt[:4]), tuple(prompt[128:132]))
        sliced += any(first in mine_starts and k < L for first, _, k in session.calls)
        assert len(recorder.rows) == len(alone) == 6
        for got, want in zip(recorder.rows, alone, strict=True):
            assert np.array_equal(got, want), f"trial {trial}: {[round(float(a), 4) for a, _ in arrivals]}"
    assert sliced >= 1  # at least one trial ran this prompt's pieces a few layers at a time beside the others


def test_prefix_reuse_across_requests(model, make_engine):
    engine = make_engine(slots=2)
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    tokens, _, _ = run_one(engine, model.encode_prompt(history), 6)
    reply = model.tokenizer.decode(tokens[:-1] if tokens[-1] in engine.eos_ids else tokens)
    turn2 = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
    ids = model.encode_prompt(turn2)
    before = engine.reused_tokens
    tokens2, _, last = run_one(engine, ids, 5)
    # the first prompt's rows are reused, in steps of ALIGN; the reply's (computed by decode steps) are not
    reusable = min(len(model.encode_prompt(history)), len(ids) - PREFILL_MIN)
    assert last.cached_tokens == reusable - reusable % ALIGN > 0 and engine.reused_tokens > before
    assert tokens2 == model.generate(ids, max_tokens=5).token_ids  # the reused KV gives the same answer


class Statuses(Observer):
    """Appends each finished request's status to `into`."""

    def __init__(self, into: list[str]):
        self.into = into

    def finished(self, status, prompt_tokens, completion_tokens):
        self.into.append(status)


def test_full_queue_is_refused_at_once_and_cancel_frees_the_slot(model, make_engine):
    finished = []  # each finished request's status

    engine = make_engine(slots=1, max_queue=1, observer=Statuses(finished))
    engine.eos_ids = frozenset()

    def slow(logits) -> int:  # a holds its slot for seconds, however fast the machine
        time.sleep(0.05)
        return int(np.argmax(logits))

    a, b, c = (Collector(model.encode_prompt(t), 100, sampler=slow) for t in ("one", "two", "three"))
    engine.submit(a.request)
    a.events.get(timeout=TIMEOUT)  # a holds the only slot
    engine.submit(b.request)  # b waits in the queue
    with pytest.raises(QueueFull):
        engine.submit(c.request)
    engine.cancel(a.request)
    assert b.events.get(timeout=TIMEOUT).completion_tokens == 1  # b got the slot
    engine.cancel(b.request)
    deadline = time.monotonic() + TIMEOUT
    while engine.active and time.monotonic() < deadline:
        threading.Event().wait(0.1)
    assert engine.active == 0 and engine.queued == 0 and finished == ["cancelled", "cancelled"]


def test_a_request_past_its_deadline_ends_as_max_tokens_would_end_it(model, make_engine):
    finished = []  # each finished request's status

    engine = make_engine(slots=1, max_queue=1, observer=Statuses(finished))
    engine.eos_ids = frozenset()
    prompt = model.encode_prompt("Hello there")
    reference = Collector(prompt, 3)  # the same request, ended by max_tokens after 3 tokens
    engine.submit(reference.request)
    ref_events = [reference.events.get(timeout=TIMEOUT) for _ in range(3)]
    late = Collector(prompt, 100)
    seen: list[GenerationResponse] = []

    def emit(event) -> None:  # on the engine thread: the deadline passes with the 3rd token
        seen.append(event)
        if len(seen) == 3:
            late.request.deadline = time.perf_counter()
        late.events.put(event)

    late.request.emit = emit
    queued = Collector(prompt, 100, deadline=time.perf_counter())  # its time runs out while it waits
    engine.submit(late.request)
    engine.submit(queued.request)
    tokens, finish, last = late.result()
    assert finish == "length" and last.completion_tokens == 3 and tokens[:3] == [e.token for e in ref_events]
    assert "".join(e.text for e in seen) == "".join(e.text for e in ref_events)  # held-back text included
    tokens, finish, last = queued.result()
    assert finish == "length" and last.completion_tokens == 0 and last.text == ""
    deadline = time.monotonic() + TIMEOUT
    while engine.active and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert engine.active == 0 and engine.queued == 0
    assert finished == ["length", "timeout", "timeout"]


def test_requests_that_cannot_run_are_refused(model, make_engine):
    engine = make_engine(slots=1)
    with pytest.raises(BudgetError, match="context length of 128"):
        engine.submit(Request([1] * 129, 4, lambda ev: None))
    with pytest.raises(Exception, match="empty"):
        engine.submit(Request([], 4, lambda ev: None))
    tokens, finish, last = run_one(engine, [1] * 126, 50)  # clipped to the context: the last token is not run
    assert finish == "length" and len(tokens) == 3
    engine.stop()
    with pytest.raises(NotAccepting):
        engine.submit(Request([1, 2], 4, lambda ev: None))


def test_run_serves_on_the_calling_thread_until_stopped(model):
    # `hy-edge serve` runs the loop on the thread that loaded the model (Engine.run): the kernels and
    # the emitted events happen there; `stop` from another thread ends it and fails what is queued
    threads: set[int] = set()
    answered = Collector(model.encode_prompt("Hello there"), 6)
    late = Collector(model.encode_prompt("x"), 6)
    engine = Engine(model.session(slots=1, max_context=128), model.tokenizer, max_queue=1)

    def emit(event) -> None:
        threads.add(threading.get_ident())
        answered.events.put(event)
        if getattr(event, "finish_reason", None):
            engine.submit(late.request)  # queued behind nothing, but the engine stops first
            engine.stop()

    engine.on_ready = lambda: engine.submit(Request(answered.request.prompt_ids, 6, emit))
    engine.run()
    tokens, reason, _ = answered.result()
    assert reason == "length" and len(tokens) == 6
    assert threads == {threading.get_ident()}
    _, reason, failed = late.result()
    assert reason == "failed" and failed.status == 503
    with pytest.raises(NotAccepting):
        engine.submit(Collector([1], 1).request)
