"""Prometheus export: scrape a real endpoint serving a real cache's metrics."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gdscache import GDSCache
from gdscache.metrics import LATENCY_BUCKETS, Metrics, start_metrics_server


def _scrape(port: int) -> dict[str, dict]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_scrape_reports_hits_misses_bytes_latency_errors_and_io_mode(tmp_path):
    kv = torch.randn(2, 2, 32, 2, 8)
    out = torch.empty_like(kv)
    with GDSCache(path=str(tmp_path), chunk_size=16, model_id="m", storage="posix") as cache:
        server = start_metrics_server(0, cache.metrics, cache.stats, addr="127.0.0.1")
        assert server is not None
        try:
            assert cache.store(list(range(32)), kv) == 32
            assert cache.retrieve(list(range(32)), out) == 32
            assert cache.retrieve(list(range(50, 82)), out) == 0
            samples = _scrape(server.port)
            stats = cache.stats()
        finally:
            server.close()
    assert _value(samples, "gdscache_hit_chunks_total") == 2 == stats["hit_chunks"]
    assert _value(samples, "gdscache_miss_chunks_total") == 2 == stats["miss_chunks"]
    assert _value(samples, "gdscache_bytes_written_total") == stats["bytes_written"] == kv.numel() * 4
    assert _value(samples, "gdscache_bytes_read_total") == stats["bytes_read"]
    assert _value(samples, "gdscache_local_write_errors_total") == 0
    assert _value(samples, "gdscache_local_corrupt_total") == 0
    assert _value(samples, "gdscache_local_chunks") == 2
    assert _value(samples, "gdscache_info", io_mode=stats["io_mode"], batch_reads="per file", batch_writes="per file",
                  storage="posix", codec="raw") == 1
    for op in ("store", "retrieve"):
        assert _value(samples, f"gdscache_{op}_latency_seconds_count") == 1
        assert _value(samples, f"gdscache_{op}_latency_seconds_bucket", le="+Inf") == 1
        assert _value(samples, f"gdscache_{op}_latency_seconds_sum") > 0


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for seconds in (0.0002, 0.003, 0.003, 20.0):
        m.observe("retrieve", seconds)
    cumulative, total = m.histograms()["retrieve"]
    assert len(cumulative) == len(LATENCY_BUCKETS) + 1
    assert cumulative[0] == 1 and cumulative[LATENCY_BUCKETS.index(0.005)] == 3 and cumulative[-1] == 4
    assert total == pytest.approx(20.0062)
    assert m.snapshot()["retrieve_latency_p50_s"] == pytest.approx(0.003)


def test_port_in_use_warns_and_returns_none(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert start_metrics_server(port, Metrics(), addr="127.0.0.1") is None
    assert "Prometheus export is off" in caplog.text


def test_failing_stats_does_not_break_the_scrape():
    m = Metrics()
    m.inc("hit_chunks", 5)

    def broken() -> dict:
        raise RuntimeError("tier gone")

    server = start_metrics_server(0, m, broken, addr="127.0.0.1")
    try:
        assert _value(_scrape(server.port), "gdscache_hit_chunks_total") == 5
    finally:
        server.close()


def test_metrics_port_config_field_serves_and_stops(tmp_path):
    kv = torch.randn(2, 2, 16, 2, 8)
    cache = GDSCache(path=str(tmp_path), chunk_size=16, model_id="m", storage="posix", metrics_port=0)
    port = cache.metrics_port
    assert port
    cache.store(list(range(16)), kv)
    assert _value(_scrape(port), "gdscache_chunks_written_total") == 1
    cache.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
