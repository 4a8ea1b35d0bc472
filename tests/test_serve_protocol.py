"""The HTTP connections of `hy-edge serve` on a real socket (uvicorn on a thread, the app over an engine stub
that is ready and never asked to generate): a client that never finishes its headers is answered 408 and
closed after --header-timeout while others are served, one that opens and sends nothing is closed, headers sent
slowly within the limit are served and each request on a kept-alive connection gets its own clock; one
connection over --max-connections gets a 503 in OpenAI's JSON shape with Retry-After, the connections already
served go on meanwhile, and a place that frees up is taken."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from serve_helpers import seconds

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402

from edge_runtime.serve.engine import Engine  # noqa: E402
from edge_runtime.serve.http import RETRY_AFTER_S, Limits, Service, build_asgi  # noqa: E402
from edge_runtime.serve.metrics import Metrics  # noqa: E402
from edge_runtime.serve.protocol import KEEP_ALIVE_S, http_config  # noqa: E402

TIMEOUT = seconds(30)  # the longest any socket below waits for the server
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


class StubSession:
    """What the engine reads of a session before its loop runs."""

    spec = SimpleNamespace(eos_token_id=[0])
    slots, prefill_chunk, max_context = 2, 16, 64


@contextlib.contextmanager
def guarded(max_connections: int, header_timeout: float | None):
    """A server with these limits; yields (port, its uvicorn config)."""
    engine = Engine(StubSession(), None)
    engine.ready.set()
    service = Service(SimpleNamespace(), "stub", engine, Metrics(engine), limits=Limits())
    config = http_config(build_asgi(service), max_connections, header_timeout, "warning", on_reject=service.count)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], config
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_response(f) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length from the socket's file `f`: (status, headers, body)."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, f.read(int(headers["content-length"]))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (read to the end: nothing more, then EOF)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def get_health(port: int) -> int:
    """/health on a connection of its own, closed after the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def rejected(port: int, status: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    line = f'hy_edge_requests_total{{status="{status}"}} '
    return float(next((row[len(line) :] for row in text.splitlines() if row.startswith(line)), "0"))


def test_a_client_that_never_finishes_its_headers_gets_408_and_is_closed_while_others_are_served():
    with guarded(max_connections=4, header_timeout=1.0) as (port, _):
        started = time.monotonic()
        slow, silent = connect(port), connect(port)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        assert get_health(port) == 200  # another connection is served meanwhile
        status, headers, body = read_response(slow.makefile("rb"))
        waited = time.monotonic() - started
        assert status == 408 and headers["connection"] == "close" and headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert "headers did not arrive within 1 s" in error["message"] and error["code"] == "request_timeout"
        assert closed_by_server(slow)
        assert closed_by_server(silent)  # nothing asked: closed without an answer
        assert waited >= 0.5  # closed by the clock, not at once
        assert rejected(port, "408") == 1
        slow.close()
        silent.close()


def test_headers_sent_slowly_within_the_limit_are_served_and_each_request_has_its_own_clock():
    with guarded(max_connections=4, header_timeout=1.0) as (port, _):
        sock = connect(port)
        f = sock.makefile("rb")
        for _ in range(2):
            for i in range(0, len(HEALTH), 8):  # 5 pieces, 0.05 s apart: 0.2 s of a 1 s limit
                sock.sendall(HEALTH[i : i + 8])
                time.sleep(0.05)
            status, _, body = read_response(f)
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            time.sleep(1.5)  # idle past the header timeout (within keep-alive): the next request's clock is its own
        assert 1.5 < KEEP_ALIVE_S
        sock.sendall(HEALTH[:20])  # a third request that stops halfway: answered 408 and closed
        assert read_response(f)[0] == 408 and closed_by_server(sock)
        sock.close()


def test_one_connection_over_the_cap_gets_a_json_503_and_a_place_that_frees_is_taken():
    with guarded(max_connections=2, header_timeout=seconds(10)) as (port, config):
        kept = [connect(port) for _ in range(2)]
        files = [s.makefile("rb") for s in kept]

        def health(i: int) -> int:
            kept[i].sendall(HEALTH)
            return read_response(files[i])[0]

        assert [health(0), health(1)] == [200, 200]  # both stay open (keep-alive)
        waiting = connect(port)  # opened while the server is full: not served yet
        assert [health(0), health(1)] == [200, 200]  # one connection too many does not refuse the served ones

        over = connect(port)
        over.sendall(HEALTH)
        status, headers, body = read_response(over.makefile("rb"))
        assert status == 503 and headers["retry-after"] == str(RETRY_AFTER_S) and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert "limit of 2 connections" in error["message"] and error["type"] == "server_error"
        assert closed_by_server(over)  # then closed; the app never saw it
        over.close()

        kept.pop().close()
        files.pop().close()  # the socket closes with its last file
        deadline = time.monotonic() + TIMEOUT
        while len(config.http.admitted) != 1:  # until the server has seen the close
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting.sendall(HEALTH)  # the freed place goes to the connection that was waiting
        assert read_response(waiting.makefile("rb"))[0] == 200
        assert health(0) == 200 and get_health(port) == 503  # full again

        waiting.close()
        while (status := get_health(port)) != 200:  # a new connection is served once one closes
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        kept[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = read_response(files[0])[2].decode()
        assert 'hy_edge_requests_total{status="503"}' in text
        kept[0].close()
