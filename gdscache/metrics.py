"""Counters and latency samples for ``GDSCache.stats()``, and their Prometheus export.

``Metrics`` keeps thread-safe counters, a bounded window of per-chunk latencies (for the p50/p99 in
``stats()``) and cumulative latency histograms (for Prometheus). :func:`start_metrics_server`
serves all of it, plus everything ``GDSCache.stats()`` reports, on ``/metrics``.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

log = logging.getLogger("gdscache")
LATENCY_SAMPLES = 10_000
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the Prometheus latency histogram buckets; +Inf is implied."""


class Metrics:
    """Thread-safe counters plus a bounded window of per-chunk latencies per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self._buckets: dict[str, list[int]] = {}
        self._sums: Counter[str] = Counter()

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def observe(self, op: str, seconds: float) -> None:
        with self._lock:
            self._latency.setdefault(op, deque(maxlen=LATENCY_SAMPLES)).append(seconds)
            counts = self._buckets.setdefault(op, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[op] += seconds

    def snapshot(self) -> dict[str, float | int]:
        with self._lock:
            out: dict[str, float | int] = dict(self.counters)
            for op, samples in self._latency.items():
                if samples:
                    arr = np.fromiter(samples, dtype=np.float64)
                    out[f"{op}_latency_p50_s"] = float(np.percentile(arr, 50))
                    out[f"{op}_latency_p99_s"] = float(np.percentile(arr, 99))
            return out

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        """``op -> (cumulative counts per bucket of LATENCY_BUCKETS then +Inf, sum of seconds)``, since creation."""
        with self._lock:
            return {op: (np.cumsum(counts).tolist(), self._sums[op]) for op, counts in self._buckets.items()}


# ------------------------------------------------------------------------------ Prometheus
def _monotonic_stats() -> set[str]:
    """``stats()`` keys that only grow (exported as counters); every other number is a gauge."""
    from gdscache.tiers.local import LocalStats

    return {f"local_{f.name}" for f in dataclasses.fields(LocalStats)} | {"dram_evictions"}


def _metric_name(name: str) -> str:
    return "gdscache_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class _Collector:
    """Builds the metric families at scrape time from ``Metrics`` and an optional ``stats()`` callable."""

    def __init__(self, metrics: Metrics, stats: Callable[[], dict[str, Any]] | None) -> None:
        self._metrics = metrics
        self._stats = stats
        self._monotonic = _monotonic_stats()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        with self._metrics._lock:
            counters = dict(self._metrics.counters)
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(_metric_name(name), f"gdscache counter {name}", value=value)
        for op, (cumulative, total) in sorted(self._metrics.histograms().items()):
            buckets = [(repr(le), c) for le, c in zip(LATENCY_BUCKETS, cumulative)] + [("+Inf", cumulative[-1])]
            yield HistogramMetricFamily(_metric_name(f"{op}_latency_seconds"), f"per-chunk {op} latency",
                                        buckets=buckets, sum_value=total)
        if self._stats is None:
            return
        try:
            stats = self._stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must never take the cache down
            log.warning("metrics: stats() failed during a scrape: %s", exc)
            return
        labels = {k: str(v) for k, v in stats.items() if isinstance(v, str)}
        if labels:
            yield InfoMetricFamily("gdscache", "I/O mode, storage and codec in use", value=labels)
        for name, value in sorted(stats.items()):
            if name in counters or isinstance(value, str) or not isinstance(value, (int, float)) \
                    or name.endswith(("_latency_p50_s", "_latency_p99_s")):
                continue
            if name in self._monotonic:
                yield CounterMetricFamily(_metric_name(name), f"gdscache {name}", value=value)
            else:
                yield GaugeMetricFamily(_metric_name(name), f"gdscache {name}", value=float(value))


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, metrics: Metrics, stats: Callable[[], dict[str, Any]] | None = None,
                         addr: str = "0.0.0.0") -> MetricsServer | None:
    """Serve Prometheus metrics on ``addr:port`` (0 picks a free port; see ``MetricsServer.port``).

    Exports every counter of ``metrics`` as ``gdscache_<name>_total``, per-chunk latency histograms
    as ``gdscache_<op>_latency_seconds``, and, when ``stats`` (e.g. ``GDSCache.stats``) is given,
    its strings as labels of ``gdscache_info`` (io_mode, storage, codec) and its numbers as gauges
    or counters. A port that cannot be bound (another rank on this host took it) logs a warning
    and returns None: metrics never stop the cache.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, stats))
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics: cannot serve on %s:%d (%s); Prometheus export is off", addr, port, exc)
        return None
    log.info("metrics: Prometheus endpoint on http://%s:%d/metrics", addr, server.server_port)
    return MetricsServer(server, thread)
