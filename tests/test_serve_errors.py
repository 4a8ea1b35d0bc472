"""Bad requests against a live `hy-edge serve` (bundled SmolLM2, 2 slots, a queue of 8, an API key): each
gets its clear 4xx in OpenAI's error shape (or a clean close), the server keeps answering the others
correctly, and nothing leaks: slots return to free and /metrics shows nothing active afterwards."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from serve_helpers import HTTP_TIMEOUT, child_env, metric, seconds, serving

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def url(default_model_file):
    args = ["--model", str(default_model_file), "--max-batch", "2", "--max-queue", "8", "--max-context", "128"]
    with serving(args, env=child_env(HY_EDGE_API_KEY=KEY)) as server:
        yield server.url


def post(url: str, body=None, path: str = "/v1/chat/completions", headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=HTTP_TIMEOUT, **kwargs)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def settled(url: str) -> None:
    """Within a bounded wait, nothing is active or queued any more."""
    deadline = time.monotonic() + seconds(10)
    while time.monotonic() < deadline:
        if metric(url, "hy_edge_active_sequences", AUTH) == 0 and metric(url, "hy_edge_queue_depth", AUTH) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"sequences still active {seconds(10):g} s after every client finished")


def test_api_key(url):
    assert get(url + "/health").status_code == 200  # exempt
    assert "key" in error_of(get(url + "/v1/models"), 401)["message"]
    error_of(get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
    error_of(post(url, HELLO, headers={}), 401)
    error_of(get(url + "/metrics"), 401)
    assert get(url + "/v1/models", headers=AUTH).status_code == 200


def test_malformed_and_mistyped_requests(url):
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={**AUTH, "content-type": "application/json"},
        timeout=HTTP_TIMEOUT,
    )
    assert "JSON" in error_of(r, 400)["message"]
    msg = [{"role": "user", "content": "hi"}]
    cases = {
        "messages": {"messages": "hi"},
        "max_tokens": {"messages": msg, "max_tokens": "5"},
        "temperature": {"messages": msg, "temperature": "hot"},
        "role": {"messages": [{"role": "wizard", "content": "hi"}]},
        "stop": {"messages": msg, "stop": 3},
    }
    for field, body in cases.items():
        assert field in error_of(post(url, body), 400)["message"], field
    error_of(post(url, {}), 400)  # no messages at all
    assert error_of(post(url, {"messages": msg, "n": 2}), 400)["param"] == "n"
    assert error_of(post(url, {"messages": msg, "model": "/etc/passwd"}), 404)["code"] == "model_not_found"
    error_of(post(url, {"prompt": 5}, path="/v1/completions"), 400)
    assert error_of(get(url + "/v1/nothing", headers=AUTH), 404)
    r = post(url, {**HELLO, "some_unknown_field": {"x": 1}})  # unknown fields are ignored
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    # a subnormal temperature overflowed the sampler (issue 27: 500, an internal error): the client's mistake
    # fields that would change the answer and are not supported or not usable: a 400 naming them, never a 200
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = [
        ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "f"}}}),  # no tools
        ("tool_choice", {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
        ("tool_choice", {"tools": [tool], "tool_choice": "always"}),
        ("tools", {"tools": [{"type": "function", "function": {"name": "a b"}}]}),
        ("tools", {"tools": [tool, tool]}),
        ("tools", {"tools": [{"type": "retrieval"}]}),
        ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}),
        ("response_format", {"tools": [tool], "response_format": {"type": "json_object"}}),
        ("function_call", {"function_call": "auto"}),
        ("top_logprobs", {"top_logprobs": 3}),
    ]
    for field, extra in refused:
        err = error_of(post(url, {**HELLO, **extra}), 400)
        assert err["param"] == field and field in err["message"], (field, err)
    for bad in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
        assert error_of(post(url, {**HELLO, "response_format": bad}), 400)["param"] == "response_format"
    assert post(url, {**HELLO, "response_format": {"type": "text"}, "tool_choice": "none"}).status_code == 200
    for field, extra in {"echo": {"echo": True}, "best_of": {"best_of": 2}, "suffix": {"suffix": "end"}}.items():
        err = error_of(post(url, {"prompt": "hi", "max_tokens": 2, **extra}, path="/v1/completions"), 400)
        assert err["param"] == field, (field, err)
    assert error_of(post(url, {"prompt": "hi", "logprobs": 6}, path="/v1/completions"), 400)["param"] == "logprobs"
    assert "temperature" in error_of(post(url, {**HELLO, "temperature": 1e-39}), 400)["message"]


def test_huge_body_is_refused(url):
    body = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    try:
        r = httpx.post(
            url + "/v1/completions",
            content=body,
            headers={**AUTH, "content-type": "application/json"},
            timeout=HTTP_TIMEOUT,
        )
    except httpx.TransportError:  # the server may close before the client has sent it all: a clean close
        pass
    else:
        assert "larger than" in error_of(r, 413)["message"]
    assert post(url, HELLO).status_code == 200


def test_context_and_max_tokens_limits(url):
    long = {"messages": [{"role": "user", "content": "word " * 400}]}
    err = error_of(post(url, long), 400)
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    for n in (0, -1, 10**9):
        assert error_of(post(url, {**HELLO, "max_tokens": n}), 400)["param"] == "max_tokens"
    error_of(post(url, {"prompt": "x" * 2000, "max_tokens": 4}, path="/v1/completions"), 400)


def test_client_disconnecting_mid_stream_frees_its_slot(url):
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=HTTP_TIMEOUT) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    settled(url)  # the engine noticed at its next step
    assert metric(url, 'hy_edge_requests_total{status="cancelled"}', AUTH) >= 1
    assert post(url, HELLO).status_code == 200


def test_a_hundred_clients_leaving_at_random_points_lose_no_slot(url):
    # each client leaves at a random point: part way through the headers or the body, after the whole
    # request (queued, prefilling, or a non-streamed answer being decoded), or part way through a stream
    import json
    import random

    rng = random.Random(5)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    want = post(url, HELLO).json()["choices"][0]["message"]["content"]

    def leave(i: int) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": f"Story {i}, please."}], "max_tokens": 48,
                           "stream": rng.random() < 0.5}).encode()  # fmt: skip
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        request, point = head + body, rng.choice(("headers", "body", "request", "answer"))
        cut = {"headers": rng.randrange(1, len(head)), "body": len(head) + rng.randrange(0, len(body))}.get(point)
        with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT) as s:
            s.sendall(request[:cut])
            if point == "answer":  # some of the answer's bytes (of a stream: its first events), then gone
                s.recv(rng.randrange(1, 600))
            time.sleep(rng.uniform(0, 0.3))

    threads: list[threading.Thread] = []
    for i in range(100):  # ten at a time
        threads.append(threading.Thread(target=leave, args=(i,)))
        threads[-1].start()
        if len(threads) >= 10:
            threads.pop(0).join(seconds(60))
    for t in threads:
        t.join(seconds(60))
    settled(url)
    assert metric(url, "hy_edge_kv_slots_in_use", AUTH) == 0
    both: list = [None, None]  # both slots serve again, at once, the answer they gave before
    pair = [threading.Thread(target=lambda j=j: both.__setitem__(j, post(url, HELLO))) for j in range(2)]
    for t in pair:
        t.start()
    for t in pair:
        t.join(seconds(120))
    assert [r.json()["choices"][0]["message"]["content"] for r in both] == [want, want]


def test_fifty_requests_on_two_slots_and_a_queue_of_eight(url):
    prompts = ["Write a poem about the sea.", "List ten animals."]
    bodies = [{**HELLO, "max_tokens": 32, "messages": [{"role": "user", "content": p}]} for p in prompts]
    want = [post(url, b).json()["choices"][0]["message"]["content"] for b in bodies]
    results: list = [None] * 50
    start = threading.Barrier(50)

    def one(i: int) -> None:
        start.wait(seconds(60))
        results[i] = post(url, bodies[i % 2])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds(300))
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 10 and statuses.count(429) >= 1
    for i, r in enumerate(results):
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"] == want[i % 2]  # served correctly meanwhile
        else:
            assert error_of(r, 429)["type"] == "rate_limit_error"
    settled(url)
    text = get(url + "/metrics", headers=AUTH).text
    assert 'hy_edge_requests_total{status="429"}' in text and "hy_edge_kv_slots_in_use 0.0" in text
    assert get(url + "/health").json() == {"status": "ok"}


def test_serve_option_errors_are_one_line(default_model_file, tmp_path):
    from click.testing import CliRunner

    from edge_runtime.cli import main
    from edge_runtime.serve.engine import MAX_STALL

    assert f"(default {MAX_STALL:g})" in " ".join(CliRunner().invoke(main, ["serve", "--help"]).stdout.split())

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, says in (
            (["--max-batch", "0"], "--max-batch"),
            (["--max-connections", "0"], "--max-connections"),
            (["--request-timeout", "-1"], "--request-timeout"),
            (["--request-timeout", "nan"], "--request-timeout"),
            (["--header-timeout", "-1"], "--header-timeout"),
            (["--header-timeout", "inf"], "--header-timeout"),
            (["--prefill-stall", "0"], "--prefill-stall"),
            (["--prefill-stall", "nan"], "--prefill-stall"),
            (["--port", "99999"], "--port"),
            (["--api-key-file", str(tmp_path / "missing")], "no such file"),
            (["--max-memory", "10MB"], "too small"),
            (["--port", port], "Address already in use"),
            (["--host", "0.0.0.0"], "--insecure-no-key"),  # open to the network without a key: refused
        ):
            r = CliRunner().invoke(main, ["serve", "--model", str(default_model_file), "--max-context", "64", *args])
            assert r.exit_code == 2 and r.stderr.startswith("hy-edge: error:") and says in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
