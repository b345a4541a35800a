"""RemoteTier and FsspecStore without a server: memory:// and file:// URLs, injected faults, option handling."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from kvtestlib import make_kv
from s3chunks import NAMESPACE, make_chunk, put_all

from gdscache import GDSCache
from gdscache.tiers.remote import RemoteTier, object_key
from io_backends.fsspec_store import DEFAULT_MULTIPART_THRESHOLD, FsspecStore, _Bodies, _s3_options, redact


@pytest.fixture
def memory_url(request):
    return f"memory://gdscache-{request.node.name.replace('[', '-').replace(']', '')}-{time.monotonic_ns()}"


@pytest.mark.parametrize("mode", ["through", "behind"])
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_round_trip_on_memory_and_file_urls(scheme, mode, memory_url, tmp_path):
    url = memory_url if scheme == "memory" else f"file://{tmp_path}/remote"
    tier = RemoteTier(url, {}, timeout_s=5, concurrency=2, write_mode=mode)
    try:
        chunks = put_all(tier, [3, 70_000])
        for key, _, payload in chunks:
            assert tier.contains(NAMESPACE, key)
            hit = tier.get(NAMESPACE, key)
            assert hit is not None and torch.equal(hit[1], payload)
        assert tier.get(NAMESPACE, b"\x01" * 16) is None
        assert sorted(tier.store.list()) == sorted(
            [object_key(NAMESPACE, k) for k, _, _ in chunks] + [f"{NAMESPACE.hex()}/namespace.json"])
        if scheme == "file":
            files = sorted(p.name for p in (tmp_path / "remote" / NAMESPACE.hex()).iterdir())
            assert files == sorted([f"{k.hex()}.gdc" for k, _, _ in chunks] + ["namespace.json"])  # no temp files
    finally:
        tier.close()


def test_corrupt_object_is_a_miss_on_memory(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=5, concurrency=2, write_mode="through")
    key, meta, payload = make_chunk(1000, 1)
    tier.put(NAMESPACE, key, meta, payload)
    path = object_key(NAMESPACE, key)
    blob = bytearray(tier.store.get(path))
    blob[-1] ^= 0xFF
    tier.store.put(path, bytes(blob))
    assert tier.get(NAMESPACE, key) is None
    assert tier.stats()["corrupt"] == 1 and tier.healthy
    tier.close()


def test_breaker_opens_after_failures_serves_fast_misses_and_recovers(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=2, concurrency=2, write_mode="through", failure_threshold=3,
                      probe_interval_s=0.05, max_attempts=2)
    key, meta, payload = make_chunk(500, 1)
    tier.put(NAMESPACE, key, meta, payload)
    down = threading.Event()
    calls = {"get": 0}
    real_get, real_check = tier.store.get, tier.store.check

    def flaky_get(path, *, timeout=None):
        calls["get"] += 1
        if down.is_set():
            raise ConnectionError("store down")
        return real_get(path, timeout=timeout)

    def flaky_check(*, timeout=None):
        if down.is_set():
            raise ConnectionError("store down")
        return real_check(timeout=timeout)

    tier.store.get, tier.store.check = flaky_get, flaky_check
    try:
        down.set()
        for _ in range(3):
            assert tier.get(NAMESPACE, key) is None
        assert calls["get"] == 6  # 3 operations x 2 attempts (retried with backoff)
        assert not tier.healthy and tier.stats()["errors"] == 3
        assert tier.get(NAMESPACE, key) is None
        assert calls["get"] == 6 and tier.stats()["fast_misses"] == 1  # open breaker: no call at all
        down.clear()
        deadline = time.monotonic() + 5
        while not tier.healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tier.healthy
        hit = tier.get(NAMESPACE, key)
        assert hit is not None and torch.equal(hit[1], payload)
    finally:
        tier.close()


def test_transient_failure_is_retried_within_one_operation(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=2, concurrency=1, write_mode="through", max_attempts=3)
    key, meta, payload = make_chunk(500, 2)
    tier.put(NAMESPACE, key, meta, payload)
    real_get = tier.store.get
    failures = iter([OSError("503 SlowDown"), TimeoutError("read timeout")])

    def get_twice_failing(path, *, timeout=None):
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return real_get(path, timeout=timeout)

    tier.store.get = get_twice_failing
    hit = tier.get(NAMESPACE, key)
    assert hit is not None and torch.equal(hit[1], payload)
    assert tier.stats()["errors"] == 0 and tier.stats()["timeouts"] == 0
    tier.close()


def test_hung_store_call_is_abandoned_at_the_deadline(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=0.5, concurrency=2, write_mode="through", max_attempts=1)
    key, meta, payload = make_chunk(500, 3)
    tier.put(NAMESPACE, key, meta, payload)
    release = threading.Event()
    real_cat = tier.store.fs.cat_file
    tier.store.fs.cat_file = lambda path, **kw: release.wait(30) and real_cat(path, **kw)
    try:
        started = time.monotonic()
        assert tier.get(NAMESPACE, key) is None
        assert time.monotonic() - started < 2.0
        assert tier.stats()["timeouts"] == 1
    finally:
        release.set()
        tier.close()


def test_full_upload_queue_drops_instead_of_blocking_forever(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=0.3, concurrency=1, write_mode="behind", queue_depth=1)
    gate = threading.Event()
    real_put = tier.store.put
    tier.store.put = lambda path, data, *, timeout=None: gate.wait(10) and real_put(path, data, timeout=timeout)
    try:
        for seed in range(4):  # one uploading, one queued, the rest dropped after timeout_s each
            tier.put(NAMESPACE, *make_chunk(100, seed))
        assert tier.stats()["dropped"] >= 1
    finally:
        gate.set()
        tier.close()
    assert tier.stats()["queue_depth"] == 0


def test_closed_tier_rejects_calls(memory_url):
    tier = RemoteTier(memory_url, {}, timeout_s=1, concurrency=1, write_mode="behind")
    tier.close()
    tier.close()
    with pytest.raises(RuntimeError, match="closed"):
        tier.get(NAMESPACE, b"k" * 16)


@pytest.mark.parametrize("kwargs, message", [
    ({"write_mode": "sideways"}, "write_mode"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"concurrency": 0}, "concurrency"),
])
def test_bad_arguments_are_clear_errors(memory_url, kwargs, message):
    args = {"timeout_s": 1.0, "concurrency": 1, "write_mode": "through", **kwargs}
    with pytest.raises(ValueError, match=message):
        RemoteTier(memory_url, {}, **args)


def test_bad_urls_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="must look like"):
        FsspecStore("bucket/prefix")
    with pytest.raises(ValueError, match="names no bucket"):
        FsspecStore("s3://", {"key": "a", "secret": "b"})
    with pytest.raises(ValueError, match="s3:// URLs only"):
        FsspecStore("memory://x", {"endpoint_url": "http://localhost"})
    with pytest.raises(ValueError, match="multipart_chunksize"):
        FsspecStore("s3://b/p", {"multipart_chunksize": 1 << 20})
    with pytest.raises(ValueError, match="multipart_threshold"):
        FsspecStore("s3://b/p", {"multipart_chunksize": 8 << 20, "multipart_threshold": 6 << 20})
    with pytest.raises(ValueError, match="cannot open"):
        FsspecStore("nosuchprotocol://x")


def test_secrets_are_redacted_from_repr_and_messages():
    options = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
               "client_kwargs": {"aws_session_token": "nested-token"}, "endpoint_url": "http://h:1"}
    store = FsspecStore("s3://bucket/prefix", options)
    shown = repr(store)
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "nested-token"):
        assert secret not in shown
        assert store.scrub(f"error with {secret} inside") == "error with *** inside"
    assert "http://h:1" in shown and "s3://bucket/prefix" in shown
    assert redact({"password": "p", "region": "r"}) == {"password": "***", "region": "r"}
    assert "user:pw" not in FsspecStore("memory://user:pw@x").describe()


def test_s3_option_translation():
    opts = _s3_options({"region": "eu-west-1", "path_style": True, "endpoint_url": "http://h:1"}, 3.0, 4)
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    assert opts["config_kwargs"]["s3"] == {"addressing_style": "path"}
    assert opts["config_kwargs"]["connect_timeout"] == 3.0 and opts["config_kwargs"]["read_timeout"] == 3.0
    assert opts["config_kwargs"]["retries"] == {"total_max_attempts": 1}
    assert opts["max_concurrency"] == 4 and opts["endpoint_url"] == "http://h:1"
    assert "region" not in opts and "path_style" not in opts
    assert "response_checksum_validation" not in opts["config_kwargs"]
    unchecked = _s3_options({}, 3.0, 4, check_read_checksums=False)["config_kwargs"]
    assert unchecked["response_checksum_validation"] == "when_required"


def test_unknown_aws_profile_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="cannot set up the S3 client.*no-such-profile"):
        RemoteTier("s3://bucket/kv", {"profile": "no-such-profile"}, timeout_s=1, concurrency=1, write_mode="through")


def test_multipart_threshold_defaults_to_at_least_two_parts():
    assert FsspecStore("s3://b/p").multipart_threshold == DEFAULT_MULTIPART_THRESHOLD
    assert FsspecStore("s3://b/p", {"multipart_chunksize": 48 << 20}).multipart_threshold == 96 << 20
    assert FsspecStore("s3://b/p", {"multipart_threshold": 20 << 20}).multipart_threshold == 20 << 20


def test_upload_bodies_are_reused_only_after_their_request_ended():
    bodies = _Bodies(keep=2)
    pieces = [memoryview(b"head"), memoryview(bytes(range(200)) * 10)]
    first = bodies.copy(pieces, 0, 2004)
    assert bytes(first) == b"".join(pieces)
    in_flight = bodies.copy(pieces, 2, 1002)  # first not sent yet: a new buffer
    assert in_flight is not first and bytes(in_flight) == b"".join(pieces)[2:1002]
    assert bodies.sending(first, len, first) == 2004  # the request ended: first is free again
    changed = [memoryview(b"HEAD"), memoryview(bytearray(b"z" * 2000))]
    again = bodies.copy(changed, 0, 2004)
    assert again is first and bytes(again) == b"HEAD" + b"z" * 2000
    with pytest.raises(ZeroDivisionError):
        bodies.sending(in_flight, lambda: 1 / 0)  # a failed request frees its body too
    assert bodies.copy(pieces, 2, 1002) is in_flight


def test_fetch_each_takes_remote_chunks_in_parallel_up_to_the_first_miss(memory_url, tmp_path):
    # what a GPU fetch task does with the chunks of its group that only the remote tier holds
    kv = make_kv(2, 8 * 16, 2, 8, seed=3)
    tokens = list(range(kv.shape[2]))
    with GDSCache(path=str(tmp_path / "a"), chunk_size=16, model_id="m", remote_url=memory_url,
                  remote_write="through") as cache:
        assert cache.store(tokens, kv) == kv.shape[2]
        keys = cache.chunk_keys(tokens)
        cache._remote.store.delete(object_key(cache.namespace, keys[5]))
    with GDSCache(path=str(tmp_path / "b"), chunk_size=16, model_id="m", remote_url=memory_url) as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens[:8], out) == 0  # less than a chunk: binds the namespace, reads nothing
        targets = cache._chunk_views(out, 0, 8)
        # the first two object-store reads each wait for the other: one at a time, they would time out (a miss)
        both_in_flight = threading.Barrier(2, timeout=20)
        calls = itertools.count()
        real_get = cache._remote.get

        def get_in_pairs(namespace, key):
            if next(calls) < 2:
                both_in_flight.wait()
            return real_get(namespace, key)

        cache._remote.get = get_in_pairs
        found = cache._fetch_each(keys, targets)
        assert not both_in_flight.broken
        assert len(found) == 5 and [f.meta.key for f in found] == keys[:5]
        for k, fetched in enumerate(found):
            assert torch.equal(fetched.payload.view(torch.float32).view(2, 2, 16, 2, 8), kv[:, :, 16 * k : 16 * (k + 1)])
        assert cache.stats()["remote_hits"] >= 5
