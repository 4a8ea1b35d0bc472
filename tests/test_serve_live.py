"""The HTTP layer of `hy-edge serve` in this process, on a real socket (uvicorn on a thread) over the serving
engine of a tiny random model whose decode steps are slowed down, so that a request outlives its client:
a non-streaming request whose client gives up is cancelled (behind the API key check), so is a stream whose
client leaves while it waits in the queue; a full queue answers 429 with Retry-After; the TTFT histogram's
clock starts when the request arrives; logprobs equal a numpy log-softmax of the model's own logits;
logit_bias bans a token; /v1/models/{id}; a request without max_tokens gets a bounded default."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from runtime_helpers import converted
from serve_helpers import seconds

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402

import edge_runtime  # noqa: E402
from edge_runtime.serve.engine import Engine  # noqa: E402
from edge_runtime.serve.http import Limits, Service, build_asgi  # noqa: E402
from edge_runtime.serve.metrics import Metrics  # noqa: E402

KEY = "live-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_S = 0.03  # each decode step takes at least this long: 200 tokens (6 s) outlast any client below
TIMEOUT = seconds(60)


class SlowSession:
    """The session with every batched decode step held back `STEP_S`."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def decode_batch(self, ids, slots):
        time.sleep(STEP_S)
        return self._session.decode_batch(ids, slots)


class SlowTokenizing:
    """The model as the HTTP layer sees it, with `delay` seconds added to every prompt's tokenizing."""

    def __init__(self, model):
        self._model, self.delay = model, 0.0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_prompt(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._model.encode_prompt(*args, **kwargs)


class Live:
    def __init__(self, model, engine, metrics, url, front):
        self.model, self.engine, self.metrics, self.url, self.front = model, engine, metrics, url, front
        self.finished: list[str] = []

    def post(self, body, path="/v1/chat/completions", **kwargs) -> httpx.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        return httpx.post(self.url + path, json=body, headers=AUTH, **kwargs)

    def settled(self) -> None:
        deadline = time.monotonic() + seconds(10)
        while self.engine.active or self.engine.queued:
            assert time.monotonic() < deadline, "a request is still running after its client left"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def live(llama_dir):
    model = edge_runtime.load(converted(llama_dir, "e4m3"), threads=1)
    metrics = Metrics()
    finished: list[str] = []
    observe = metrics.finished

    def finished_hook(status, prompt_tokens, completion_tokens):
        finished.append(status)
        observe(status, prompt_tokens, completion_tokens)

    metrics.finished = finished_hook
    session = SlowSession(model.session(slots=1, max_context=256))
    engine = Engine(session, model.tokenizer, max_queue=1, observer=metrics)
    engine.eos_ids = frozenset()  # random weights may sample EOS: every request runs to its max_tokens
    metrics.engine = engine
    engine.start()
    assert engine.ready.wait(TIMEOUT)
    front = SlowTokenizing(model)
    service = Service(front, "tiny", engine, metrics, api_key=KEY, limits=Limits())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_asgi(service), lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    state = Live(model, engine, metrics, url, front)
    state.finished, state.service = finished, service
    yield state
    server.should_exit = True
    thread.join(TIMEOUT)
    engine.stop()


LONG = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "temperature": 0}


def test_a_non_streaming_client_that_gives_up_is_cancelled(live):
    live.finished.clear()
    with pytest.raises(httpx.ReadTimeout):
        live.post(LONG, timeout=0.5)  # leaves after 0.5 s; the answer needs >= 200 * STEP_S = 6 s
    live.settled()
    assert live.finished == ["cancelled"]


def test_a_stream_whose_client_leaves_in_the_queue_frees_its_place(live):
    live.finished.clear()
    running = threading.Thread(target=lambda: live.post({**LONG, "max_tokens": 60}))
    running.start()
    deadline = time.monotonic() + TIMEOUT
    while not live.engine.active:  # the only slot is taken
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with httpx.stream(
        "POST", live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}, headers=AUTH
    ) as r:
        assert r.status_code == 200 and live.engine.queued == 1  # waiting: not one byte of the body yet
    running.join(TIMEOUT)
    live.settled()
    assert sorted(live.finished) == ["cancelled", "length"]


def test_a_full_queue_answers_429_with_retry_after(live):
    first = threading.Thread(target=lambda: live.post({**LONG, "max_tokens": 40}))
    first.start()
    deadline = time.monotonic() + TIMEOUT
    while not live.engine.active:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=lambda: live.post({**LONG, "max_tokens": 2}))
    second.start()
    while not live.engine.queued and live.engine.active:
        time.sleep(0.01)
    r = live.post({**LONG, "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    first.join(TIMEOUT), second.join(TIMEOUT)
    live.settled()


def test_ttft_is_timed_from_the_request_arrival(live):
    live.front.delay = 0.3  # tokenizing a long prompt: part of what the client waits for
    try:
        before = live.metrics.ttft.collect()[0].samples
        total = {s.name: s.value for s in before}["hy_edge_time_to_first_token_seconds_sum"]
        assert live.post({**LONG, "max_tokens": 1}).status_code == 200
    finally:
        live.front.delay = 0.0
    after = {s.name: s.value for s in live.metrics.ttft.collect()[0].samples}
    assert after["hy_edge_time_to_first_token_seconds_sum"] - total >= 0.3


def first_logprobs(model) -> np.ndarray:
    """log-softmax (V,) of LONG's first token, from a session of its own (numpy, float64)."""
    ids = model.encode_prompt([{"role": "user", "content": "Hello"}])
    session = model.session(slots=1, max_context=64)
    logits = session.forward(np.asarray(ids, np.int64), slot=0).astype(np.float64)  # (V,)
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def test_logprobs_equal_a_log_softmax_of_the_models_logits(live):
    want = first_logprobs(live.model)
    order = np.argsort(-want, kind="stable")[:5]
    r = live.post({**LONG, "max_tokens": 3, "logprobs": True, "top_logprobs": 5}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    first = content[0]
    assert first["token"] == live.model.tokenizer.decode([int(order[0])], skip_special_tokens=False)  # greedy
    np.testing.assert_allclose(first["logprob"], want[order[0]], atol=1e-4)
    np.testing.assert_allclose([t["logprob"] for t in first["top_logprobs"]], want[order], atol=1e-4)
    assert sum(np.exp(t["logprob"]) for t in first["top_logprobs"]) <= 1 + 1e-6
    assert r["choices"][0]["logprobs"]["content"][1]["logprob"] <= 0
    # completions: the legacy columns, one per token, streamed too
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    legacy = live.post(body, path="/v1/completions").json()["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) == 4
    for top, lp in zip(legacy["top_logprobs"], legacy["token_logprobs"], strict=True):  # greedy: the most likely
        assert lp >= max(top.values())  # (keyed by text: two tokens of one text keep one entry, as OpenAI's)
    with httpx.stream(
        "POST", live.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=TIMEOUT
    ) as s:
        chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [
        lp for c in chunks for lp in (json.loads(c[6:])["choices"][0]["logprobs"] or {}).get("token_logprobs", [])
    ]
    np.testing.assert_allclose(streamed, legacy["token_logprobs"])
    assert live.post({**LONG, "logprobs": False, "max_tokens": 2}).json()["choices"][0]["logprobs"] is None


def test_logit_bias_bans_and_forces_tokens(live):
    order = np.argsort(-first_logprobs(live.model), kind="stable")
    piece = lambda t: live.model.tokenizer.decode([int(t)], skip_special_tokens=False)  # noqa: E731
    bias = {str(order[0]): -100}  # the greedy first token banned: the second most likely comes instead
    banned = live.post({**LONG, "max_tokens": 1, "logit_bias": bias, "logprobs": True}).json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] == piece(order[1])
    forced = live.post({**LONG, "max_tokens": 3, "logit_bias": {"7": 100}, "logprobs": True}).json()
    pieces = forced["choices"][0]["logprobs"]["content"]
    assert [p["token"] for p in pieces] == [piece(7)] * 3
    for bad in ({"x": 1}, {"-1": 1}, {"7": 101}, {str(live.model.spec.vocab_size): 1}):
        r = live.post({**LONG, "logit_bias": bad})
        assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text


def test_model_card_by_id(live):
    r = httpx.get(live.url + "/v1/models/tiny", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    r = httpx.get(live.url + "/v1/models/other", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(live.url + "/v1/models/tiny", timeout=TIMEOUT).status_code == 401


def test_a_request_without_max_tokens_gets_the_default_bound(live):
    limits = live.service.limits
    live.service.limits = dataclasses.replace(limits, default_max_tokens=5)
    try:
        body = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
        r = live.post(body).json()
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
        assert live.post({**body, "max_tokens": 7}).json()["usage"]["completion_tokens"] == 7  # asked: up to the cap
    finally:
        live.service.limits = limits


def test_a_request_past_the_time_limit_ends_with_length(live):
    # 200 tokens take at least 6 s (STEP_S a step): the limit ends them first, streamed or not
    limits = live.service.limits
    live.service.limits = dataclasses.replace(limits, request_timeout=seconds(1.0))
    try:
        r = live.post(LONG).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] < 200
        with httpx.stream(
            "POST", live.url + "/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH, timeout=TIMEOUT
        ) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) < 200
    finally:
        live.service.limits = limits
    live.settled()
    assert live.finished[-2:] == ["timeout", "timeout"]
