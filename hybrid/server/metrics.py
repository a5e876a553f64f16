"""Prometheus metrics of one app, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        # process_resident_memory_bytes (the RSS `hybrid rules` predicts), CPU seconds, open files
        ProcessCollector(registry=r)

    def watch(self, engine, backend) -> None:
        """Read the engine's queue and slots (engine.stats()) and the server's requests at scrape time."""
        self.queue_depth.set_function(lambda: engine.stats()["waiting"])
        self.running.set_function(lambda: engine.stats()["running"])
        self.free_slots.set_function(lambda: engine.stats()["free_slots"])
        self.inflight.set_function(lambda: backend.inflight)
        self.registry.register(_PrefixCacheCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)



class _PrefixCacheCollector:
    """The engine's prefix cache (engine.stats()["prefix_cache"]), read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []   # nothing fixed to check at registration: the engine is read at scrape time

    def collect(self):
        pc = self.engine.stats().get("prefix_cache")
        if pc is None:
            return
        yield GaugeMetricFamily("hybrid_prefix_cache_bytes", "Bytes of KV the prefix cache holds",
                                value=pc["bytes_used"])
        yield GaugeMetricFamily("hybrid_prefix_cache_budget_bytes", "Most bytes the prefix cache may hold (0: off)",
                                value=pc["budget_bytes"])
        yield CounterMetricFamily("hybrid_prefix_cache_hits", "Requests that reused cached prompt KV", value=pc["hits"])
        yield CounterMetricFamily("hybrid_prefix_cache_lookups", "Requests looked up in the prefix cache",
                                  value=pc["lookups"])
        yield CounterMetricFamily("hybrid_prefix_cache_reused_tokens", "Prompt tokens copied from the prefix cache "
                                  "instead of prefilled", value=pc["tokens_reused"])
        yield CounterMetricFamily("hybrid_prefix_cache_evictions", "Blocks evicted from the prefix cache",
                                  value=pc["evictions"])
