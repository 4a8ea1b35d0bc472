"""The ASGI app of `hy-edge serve` in process, over an engine whose loop has not started (still loading):
/health says 503 until the engine is ready, requests meanwhile get 503 in OpenAI's shape, /metrics lists
every series from the start, and a chunked body over the limit is refused like a declared one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from edge_runtime.serve.engine import Engine  # noqa: E402
from edge_runtime.serve.http import Limits, Service, build_asgi  # noqa: E402
from edge_runtime.serve.metrics import Metrics  # noqa: E402


class StubSession:
    """What the engine reads of a session before its loop runs."""

    spec = SimpleNamespace(eos_token_id=[0])
    slots, prefill_chunk, max_context = 2, 16, 64


@pytest.fixture
def app():
    engine = Engine(StubSession(), None)
    metrics = Metrics(engine)
    model = SimpleNamespace(encode_prompt=lambda prompt, **kw: [1, 2, 3])
    service = Service(model, "stub", engine, metrics, limits=Limits(max_body_bytes=1000))
    return TestClient(build_asgi(service)), engine


def test_health_is_503_while_loading_and_requests_are_refused(app):
    client, engine = app
    r = client.get("/health")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["message"] == "the server is loading"
    assert client.get("/v1/models").json()["data"][0]["id"] == "stub"
    engine.ready.set()
    assert client.get("/health").json() == {"status": "ok"}
    engine.drain(0)  # SIGTERM: the listener stays open, and says why it refuses
    r = client.get("/health")
    assert (r.status_code, r.json()) == (503, {"status": "stopping"})
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down"


def test_metrics_list_every_series(app):
    client, _ = app
    text = client.get("/metrics").text
    for name in (
        "hy_edge_time_to_first_token_seconds_bucket",
        "hy_edge_inter_token_latency_seconds_bucket",
        "hy_edge_prompt_tokens_total",
        "hy_edge_completion_tokens_total",
        "hy_edge_prompt_tokens_reused_total",
        "hy_edge_queue_depth 0.0",
        "hy_edge_active_sequences 0.0",
        "hy_edge_kv_slots_in_use 0.0",
        "hy_edge_kv_slots 2.0",
        "process_resident_memory_bytes",
    ):
        assert name in text, name


def test_a_chunked_body_over_the_limit_is_refused(app):
    client, _ = app

    def chunks():
        for _ in range(20):
            yield b"x" * 100

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["error"]["message"]
    assert 'hy_edge_requests_total{status="413"} 1.0' in client.get("/metrics").text
