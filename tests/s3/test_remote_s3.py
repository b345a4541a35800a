"""RemoteTier against a real S3 server (SeaweedFS): round trips, multipart, faults, outages, start-up errors."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch
from s3chunks import NAMESPACE, make_chunk, put_all

from gdscache.format.chunkfile import pack_object
from gdscache.tiers.remote import RemoteTier, object_key

pytestmark = pytest.mark.s3

TIMEOUT_S = 1.5
SLACK_S = 1.0  # scheduling slack on a busy 2-core machine; the point is "bounded", not "fast"


def _tier(seaweed, bucket, *, mode="through", timeout_s=10.0, **options) -> RemoteTier:
    """A tier with generous deadlines unless the test is about deadlines (a busy host stalls requests)."""
    return RemoteTier(f"s3://{bucket}/kv", seaweed.options(**options), timeout_s=timeout_s, concurrency=4,
                      write_mode=mode, probe_interval_s=0.2)


def _wait_healthy(tier: RemoteTier, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if tier.healthy:
            return True
        time.sleep(0.1)
    return tier.healthy


@pytest.mark.parametrize("mode", ["through", "behind"])
def test_round_trip_and_object_layout(seaweed, bucket, mode):
    tier = _tier(seaweed, bucket, mode=mode)
    try:
        chunks = put_all(tier, [1, 4096, 300_000])
        for key, meta, payload in chunks:
            assert tier.contains(NAMESPACE, key)
            got = tier.get(NAMESPACE, key)
            assert got is not None
            assert got[0].key == key and got[0].payload_digest == meta.payload_digest
            assert torch.equal(got[1], payload)
        missing = make_chunk(10, 99)[0]
        assert tier.get(NAMESPACE, missing) is None
        assert not tier.contains(NAMESPACE, missing)
        listed = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket)["Contents"]}
        assert listed == {f"kv/{object_key(NAMESPACE, k)}" for k, _, _ in chunks} | {f"kv/{NAMESPACE.hex()}/namespace.json"}
        stats = tier.stats()
        assert (stats["puts"], stats["hits"], stats["misses"], stats["errors"], stats["timeouts"]) == (3, 3, 1, 0, 0)
        assert stats["healthy"] is True and stats["queue_depth"] == 0
    finally:
        tier.close()


def test_large_chunk_goes_multipart(seaweed, bucket):
    tier = _tier(seaweed, bucket, timeout_s=30, multipart_chunksize=8 << 20, multipart_threshold=32 << 20)
    try:
        key, meta, payload = make_chunk(32 << 20, 7)
        tier.put(NAMESPACE, key, meta, payload)
        head = seaweed.client().head_object(Bucket=bucket, Key=f"kv/{object_key(NAMESPACE, key)}")
        assert head["ContentLength"] == 4096 + (32 << 20)
        assert head["ETag"].strip('"').endswith("-4")  # 4 parts of 8 MiB, the last one also holds the 4 KiB header's worth
        got = tier.get(NAMESPACE, key)
        assert got is not None and torch.equal(got[1], payload)
    finally:
        tier.close()


def test_credentials_from_the_aws_environment(seaweed, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.options()["secret"])
    options = {"endpoint_url": seaweed.endpoint, "path_style": True, "region": "us-east-1"}
    tier = RemoteTier(f"s3://{bucket}", options, timeout_s=5, concurrency=2, write_mode="through")
    try:
        key, meta, payload = make_chunk(1000, 1)
        tier.put(NAMESPACE, key, meta, payload)
        assert seaweed.client().head_object(Bucket=bucket, Key=object_key(NAMESPACE, key))["ContentLength"] == 5096
    finally:
        tier.close()


def test_prefix_option_adds_to_the_url_path(seaweed, bucket):
    tier = _tier(seaweed, bucket, prefix="team/a")
    try:
        key, meta, payload = make_chunk(10, 2)
        tier.put(NAMESPACE, key, meta, payload)
        seaweed.client().head_object(Bucket=bucket, Key=f"kv/team/a/{object_key(NAMESPACE, key)}")
    finally:
        tier.close()


def test_wrong_credentials_fail_at_start_up_without_leaking_the_secret(seaweed, bucket):
    options = seaweed.options(key="testing", secret="not-the-secret-1234")
    with pytest.raises(ValueError, match="access denied") as info:
        RemoteTier(f"s3://{bucket}/kv", options, timeout_s=5, concurrency=2, write_mode="through")
    assert "not-the-secret-1234" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_bucket_fails_at_start_up(seaweed):
    seaweed.ensure_running()
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-x1' does not exist"):
        RemoteTier("s3://no-such-bucket-x1/kv", seaweed.options(), timeout_s=5, concurrency=2, write_mode="behind")


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage", "other_key"])
def test_corrupt_object_is_a_miss(seaweed, bucket, damage, caplog):
    tier = _tier(seaweed, bucket)
    client = seaweed.client()
    try:
        key, meta, payload = make_chunk(20_000, 3)
        tier.put(NAMESPACE, key, meta, payload)
        name = f"kv/{object_key(NAMESPACE, key)}"
        blob = bytearray(client.get_object(Bucket=bucket, Key=name)["Body"].read())
        if damage == "flip_payload":
            blob[4096 + 12_345] ^= 0x01
        elif damage == "truncate":
            del blob[-100:]
        elif damage == "garbage":
            blob = bytearray(b"not a chunk" * 10)
        else:  # a valid chunk of another key stored under this key
            _, other_meta, other_payload = make_chunk(20_000, 4)
            blob = bytearray(pack_object(other_meta, other_payload))
        client.put_object(Bucket=bucket, Key=name, Body=bytes(blob))
        with caplog.at_level(logging.WARNING, logger="gdscache.tiers.remote"):
            assert tier.get(NAMESPACE, key) is None
        assert tier.stats()["corrupt"] == 1 and tier.stats()["errors"] == 0
        assert "corrupt" in caplog.text
        assert tier.healthy  # a bad object is the object's fault, not the store's
    finally:
        tier.close()


def test_outage_degrades_to_misses_within_the_deadline_then_recovers(seaweed, bucket):
    tier = _tier(seaweed, bucket, timeout_s=TIMEOUT_S)
    try:
        stored = [make_chunk(50_000, seed) for seed in range(3)]
        for key, meta, payload in stored:
            tier.put(NAMESPACE, key, meta, payload)
        seaweed.kill()
        for i, (key, _, _) in enumerate(stored):  # every call returns, as a miss, within the deadline
            started = time.monotonic()
            assert tier.get(NAMESPACE, key) is None
            assert not tier.contains(NAMESPACE, key)
            tier.put(NAMESPACE, *make_chunk(1000, 50 + i))
            assert time.monotonic() - started < 3 * TIMEOUT_S + SLACK_S
        stats = tier.stats()
        assert stats["healthy"] is False
        assert stats["errors"] + stats["timeouts"] >= 3 and stats["fast_misses"] > 0
        assert stats["hits"] == 0 and stats["dropped"] == 3

        seaweed.start()  # same ports, same data
        assert _wait_healthy(tier), "remote tier did not recover after the server came back"
        for key, _, payload in stored:  # what was stored before the outage is still there
            got = tier.get(NAMESPACE, key)
            assert got is not None and torch.equal(got[1], payload)
        key, meta, payload = make_chunk(2000, 77)
        tier.put(NAMESPACE, key, meta, payload)
        assert tier.contains(NAMESPACE, key)
    finally:
        seaweed.ensure_running()
        tier.close()


def test_frozen_server_never_holds_the_caller_past_the_deadline(seaweed, bucket):
    tier = _tier(seaweed, bucket, mode="behind", timeout_s=TIMEOUT_S)
    key, meta, payload = make_chunk(5000, 5)
    tier.put(NAMESPACE, key, meta, payload)
    tier.flush()
    seaweed.freeze()
    try:
        for op in (lambda: tier.get(NAMESPACE, key), lambda: tier.contains(NAMESPACE, key)):
            started = time.monotonic()
            assert op() in (None, False)
            assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        started = time.monotonic()
        tier.put(NAMESPACE, *make_chunk(5000, 6))
        tier.flush()  # the upload behind fails within its deadline too
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        assert tier.stats()["timeouts"] >= 3
    finally:
        seaweed.thaw()
    assert _wait_healthy(tier)
    got = tier.get(NAMESPACE, key)
    assert got is not None and torch.equal(got[1], payload)
    tier.close()


def test_unreachable_at_start_up_starts_degraded_and_misses_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s", "path_style": True}
    tier = RemoteTier("s3://bucket/kv", options, timeout_s=1.0, concurrency=2, write_mode="behind")
    try:
        assert not tier.healthy
        key, meta, payload = make_chunk(100, 1)
        started = time.monotonic()
        assert tier.get(NAMESPACE, key) is None
        tier.put(NAMESPACE, key, meta, payload)
        tier.flush()
        assert time.monotonic() - started < 0.5  # no network at all while the breaker is open
        assert tier.stats()["fast_misses"] == 1 and tier.stats()["dropped"] == 1
    finally:
        tier.close()
