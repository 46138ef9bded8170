"""Prometheus metrics of one server (its own registry, so that several apps in one process,
as in tests, never share counters). Gauges read the engine thread's last snapshot, taken between
steps; latencies are measured where the client sees them, as tokens reach the HTTP layer.

An engine that has stopped (a dead tensor-parallel worker, a fault that ended its thread) runs
nothing and holds nothing, whatever its last snapshot said: its running, waiting and used-block
gauges read 0, and engine_healthy reads 0 (1 while it can serve)."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from pixtral_fast.runtime.async_engine import AsyncEngine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
PREFIX = "pixtral_fast_"


class ServerMetrics:
    def __init__(self, async_engine: AsyncEngine):
        self.registry = r = CollectorRegistry()
        for name, doc, key in (("kv_cache_used_blocks", "KV cache blocks held by sequences", "used_blocks"),
                               ("kv_cache_total_blocks", "KV cache blocks in all (scratch block excluded)",
                                "total_blocks"),
                               ("requests_running", "sequences in the running batch", "running"),
                               ("requests_waiting", "sequences waiting to start (queued or preempted)", "waiting")):
            Gauge(PREFIX + name, doc, registry=r).set_function(_snapshot_reader(async_engine, key))
        Gauge(PREFIX + "engine_healthy", "1 while the engine can serve, 0 once it has stopped (see /health)",
              registry=r).set_function(lambda: float(engine_problem(async_engine) is None))
        r.register(SnapshotCounters(async_engine, (
            ("encoder_cache_hits", "images whose embeddings came from the encoder cache"),
            ("encoder_cache_misses", "images the ViT encoded (the encoder cache did not hold them)"),
            ("encoder_cache_evictions", "encoder cache entries dropped to make room"))))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens prefilled (once per choice)",
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=r)
        self.finished = Counter(PREFIX + "requests_finished", "finished sequences by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter(PREFIX + "http_errors", "error responses by status code", ["status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request arrival to its last token",
                             buckets=E2E_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def engine_death(async_engine: AsyncEngine) -> str | None:
    """Why the engine died, or None: what stopped its thread, or (under tensor parallelism) a
    failed step or a worker that has died, seen before the next step finds it. An engine closed
    on purpose (a shutdown) has not died."""
    if async_engine.fault is not None:
        return f"the engine stopped: {async_engine.fault}"
    return async_engine.engine.health()


def engine_problem(async_engine: AsyncEngine) -> str | None:
    """Why the engine cannot serve, or None: it died, or its thread is not running."""
    if (death := engine_death(async_engine)) is not None:
        return death
    return None if async_engine.thread_alive else "the engine is not running"


class SnapshotCounters:
    """Counters the engine keeps itself (EngineStats), read from its last snapshot at each scrape."""

    def __init__(self, async_engine: AsyncEngine, counters: tuple[tuple[str, str], ...]):
        self.async_engine, self.counters = async_engine, counters

    def collect(self):
        for key, doc in self.counters:
            yield CounterMetricFamily(PREFIX + key, doc, value=self.async_engine.snapshot[key])


def _snapshot_reader(async_engine: AsyncEngine, key: str):
    """The gauge function of one snapshot count: 0 for what a stopped engine no longer holds (its
    total blocks stay what they are)."""
    def read() -> float:
        if key != "total_blocks" and engine_problem(async_engine) is not None:
            return 0.0
        return async_engine.snapshot[key]
    return read


class ChoiceTimer:
    """Latencies of one sequence, fed with each delivery of tokens."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics, self.arrival, self.last = metrics, arrival, None
        self.done = False

    def tokens(self, n: int) -> None:
        if n == 0:
            return
        t = time.perf_counter()
        m = self.metrics
        m.generation_tokens.inc(n)
        if self.last is None:
            m.ttft.observe(t - self.arrival)
            n -= 1
        if n and self.last is not None:
            gap = (t - self.last) / n  # tokens delivered together share the interval
            for _ in range(n):
                m.itl.observe(gap)
        self.last = t

    def finish(self, reason: str) -> None:
        self.done = True
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.finished.labels(reason).inc()
