"""`GET /metrics` of `hy-edge serve`, in Prometheus' text format (prometheus-client): the engine's
observer (engine.Observer) feeds the histograms and counters; gauges are read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine import Engine, Observer

# latency buckets from 5 ms (a decode step of a 135M model) to a minute (a long prompt on a Pi)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class Metrics(Observer):
    def __init__(self, engine: Engine | None = None):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.ttft = Histogram(
            "hy_edge_time_to_first_token_seconds", "Request arrival to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "hy_edge_inter_token_latency_seconds",
            "Time between two tokens of a stream",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("hy_edge_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("hy_edge_completion_tokens", "Generated tokens", registry=r)
        self.reused_tokens = Counter(
            "hy_edge_prompt_tokens_reused", "Prompt tokens taken from a slot's KV cache (prefix reuse)", registry=r
        )
        self.requests = Counter(
            "hy_edge_requests",
            "Requests by outcome: stop | length | timeout | cancelled | error, or the HTTP status of a refusal",
            ["status"],
            registry=r,
        )
        self.engine = engine
        gauges = {
            "hy_edge_queue_depth": ("Requests waiting for a slot", lambda e: e.queued),
            "hy_edge_active_sequences": ("Sequences being prefilled or decoded", lambda e: e.active),
            "hy_edge_kv_slots_in_use": ("KV cache slots holding a running sequence", lambda e: e.active),
            "hy_edge_kv_slots": ("KV cache slots (--max-batch)", lambda e: e.slots),
            "hy_edge_context_length": ("Context length of each slot", lambda e: e.max_context),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda read=read: read(self.engine) if self.engine else 0)

    # -- engine.Observer (called on the engine thread) -------------------------------------------
    def admitted(self, reused_tokens: int) -> None:
        self.reused_tokens.inc(reused_tokens)

    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def finished(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    # -- the HTTP layer ----------------------------------------------------------------------------------
    def rejected(self, status: str) -> None:
        self.requests.labels(status).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
