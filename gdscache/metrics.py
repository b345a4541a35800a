"""Counters and latency samples for ``GDSCache.stats()``."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

LATENCY_SAMPLES = 10_000


class Metrics:
    """Thread-safe counters plus a bounded window of per-chunk latencies per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._latency: dict[str, deque[float]] = {}

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def observe(self, op: str, seconds: float) -> None:
        with self._lock:
            self._latency.setdefault(op, deque(maxlen=LATENCY_SAMPLES)).append(seconds)

    def snapshot(self) -> dict[str, float | int]:
        with self._lock:
            out: dict[str, float | int] = dict(self.counters)
            for op, samples in self._latency.items():
                if samples:
                    arr = np.fromiter(samples, dtype=np.float64)
                    out[f"{op}_latency_p50_s"] = float(np.percentile(arr, 50))
                    out[f"{op}_latency_p99_s"] = float(np.percentile(arr, 99))
            return out
