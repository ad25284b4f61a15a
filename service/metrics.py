"""Prometheus metrics, correct under several gunicorn workers.

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before workers start; each
worker then writes its samples there and /metrics aggregates all of them (prometheus_client's
multiprocess mode). Without that variable (tests, `flask run`) the process registry is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

disable_created_metrics()  # *_created series double the output and nobody graphs them

REQUESTS = Counter("lstm_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "lstm_request_duration_seconds",
    "Time to answer a request (for streams: to the first byte)",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GENERATED_TOKENS = Counter("lstm_generated_tokens_total", "Tokens generated (rate() gives tokens/s)")
PROMPT_TOKENS = Counter("lstm_prompt_tokens_total", "Prompt and scored tokens consumed by prefill")
GENERATION_SPEED = Histogram(
    "lstm_generation_tokens_per_second",
    "Decode speed of each finished generation request",
    buckets=(10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
BATCH_SIZE = Histogram(
    "lstm_batch_size", "Sequences stepped together per scheduler tick", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
STORE_ERRORS = Counter("lstm_store_errors_total", "Session store failures (unreachable, corrupt state)", ["kind"])
PREFIX_LOOKUPS = Counter(
    "lstm_prefix_cache_lookups_total",
    "/v1 prompt-prefix cache lookups by outcome (hit, miss, error: store failed, skipped: off or pausing)",
    ["outcome"],
)
PREFIX_CACHED_TOKENS = Counter("lstm_prefix_cached_tokens_total", "/v1 prompt tokens served from the prefix cache")


class _SessionsCollector(Collector):
    """Live sessions, asked of the store at scrape time (a cheap ZCARD, never a key scan)."""

    def __init__(self, count: Callable[[], int]):
        self._count = count

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "lstm_active_sessions",
            "Sessions of this model: alive (in-process store) or written in the last hour (Redis, an estimate)",
        )
        try:
            gauge.add_metric([], float(self._count()))
        except Exception:  # store down: report nothing rather than fail the scrape
            STORE_ERRORS.labels("metrics").inc()
            return []
        return [gauge]


def render(count_sessions: Callable[[], int], multiprocess: bool) -> bytes:
    """The exposition text for /metrics; `multiprocess` when PROMETHEUS_MULTIPROC_DIR is set."""
    if multiprocess:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        base = generate_latest(registry)
    else:
        base = generate_latest(REGISTRY)
    extra = CollectorRegistry()
    extra.register(_SessionsCollector(count_sessions))
    return base + generate_latest(extra)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_app(app: Flask, *, multiprocess: bool) -> None:
    """Count and time every request. `multiprocess`: PROMETHEUS_MULTIPROC_DIR is set (gunicorn)."""
    app.config["METRICS_MULTIPROCESS"] = multiprocess

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        # every label takes few values: route patterns (never raw paths), known methods, statuses
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in _METHODS else "other"
        REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
        if "started" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        return response


for _kind in ("unavailable", "corrupt_state", "metrics", "unreplicated"):
    STORE_ERRORS.labels(_kind)  # export zeros, so alerts on increase() work from the start
for _outcome in ("hit", "miss", "error", "skipped"):
    PREFIX_LOOKUPS.labels(_outcome)
