"""Prometheus metrics of one app, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hybrid_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens submitted to the engine", registry=r)
        self.generated_tokens = Counter("hybrid_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "Submission to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("hybrid_generation_tokens_per_second",
                                           "Decode speed of each finished generation (tokens after the first)",
                                           buckets=_TPS_BUCKETS, registry=r)
        self.cancelled = Counter("hybrid_cancelled_generations", "Generations cancelled before they finished (client gone)", registry=r)
        self.queue_depth = Gauge("hybrid_queue_depth", "Generations waiting for an engine slot", registry=r)
        self.running = Gauge("hybrid_running_requests", "Generations holding an engine slot", registry=r)
        self.active = Gauge("hybrid_active_streams", "Generations submitted and not yet finished", registry=r)
        self.inflight = Gauge("hybrid_inflight_requests", "Generation requests being served (HTTP side)",
                              registry=r)
        self.free_slots = Gauge("hybrid_free_slots", "Engine KV-cache slots free", registry=r)

    def watch(self, engine, backend) -> None:
        """Read the engine's queue and slots (engine.stats()) and the server's requests at scrape time."""
        self.queue_depth.set_function(lambda: engine.stats()["waiting"])
        self.running.set_function(lambda: engine.stats()["running"])
        self.free_slots.set_function(lambda: engine.stats()["free_slots"])
        self.inflight.set_function(lambda: backend.inflight)

    def render(self) -> bytes:
        return generate_latest(self.registry)

