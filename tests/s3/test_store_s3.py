"""FsspecStore's S3 uploads against SeaweedFS: single PUT vs multipart, and failed uploads leave nothing."""

from __future__ import annotations

import os
import threading
import time

import pytest

from io_backends.fsspec_store import MIN_PART_SIZE, FsspecStore

pytestmark = pytest.mark.s3

PART = MIN_PART_SIZE


def _store(seaweed, bucket, *, concurrency=2, timeout_s=30.0, threshold=2 * PART) -> FsspecStore:
    return FsspecStore(f"s3://{bucket}/objs", seaweed.options(multipart_chunksize=PART, multipart_threshold=threshold),
                       timeout_s=timeout_s, concurrency=concurrency)


def _pending_uploads(client, bucket) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _wait_no_pending_uploads(client, bucket, within_s: float = 30.0) -> list[dict]:
    """The abort runs on the store's pool after the requests still in flight end: wait for it."""
    deadline = time.monotonic() + within_s
    while (pending := _pending_uploads(client, bucket)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pending


@pytest.mark.parametrize("size, parts, threshold", [
    (2 * PART - 1, 0, 2 * PART),          # under the threshold: one PUT
    (2 * PART, 2, 2 * PART),
    (2 * PART + PART // 2, 2, 2 * PART),  # the last part takes the remainder
    (3 * PART + 7, 3, 2 * PART),
    (3 * PART + 7, 0, 4 * PART),          # three parts' worth, under a higher threshold: one PUT
    (PART + 7, 1, PART),                  # a threshold of one part: a one-part upload
])
def test_put_round_trip_single_or_multipart(seaweed, bucket, size, parts, threshold):
    store = _store(seaweed, bucket, threshold=threshold)
    client = seaweed.client()
    try:
        data = os.urandom(size)
        store.put("a/b.bin", data)
        etag = client.head_object(Bucket=bucket, Key="objs/a/b.bin")["ETag"].strip('"')
        assert etag.endswith(f"-{parts}") if parts else "-" not in etag
        assert bytes(store.get("a/b.bin")) == data
        assert _pending_uploads(client, bucket) == []
        again = bytearray(os.urandom(size))  # the next upload of this size reuses a body buffer
        expected = bytes(again)
        store.put("a/c.bin", [memoryview(again)[:100], memoryview(again)[100:]])
        again[:8] = b"changed!"  # the caller's buffer is free once put returns
        assert bytes(store.get("a/c.bin")) == expected
        assert bytes(store.get("a/b.bin")) == data
    finally:
        store.close()


def test_failed_part_aborts_the_upload_and_leaves_no_object(seaweed, bucket):
    store = _store(seaweed, bucket, concurrency=1)
    client = seaweed.client()
    s3 = store._blocking_s3
    real_upload_part = s3.client.upload_part

    def second_part_fails(**kwargs):
        if kwargs["PartNumber"] == 2:
            raise ConnectionError("connection reset while sending part 2")
        return real_upload_part(**kwargs)

    s3.client.upload_part = second_part_fails
    try:
        with pytest.raises(ConnectionError, match="part 2"):
            store.put("x.bin", os.urandom(3 * PART))
        assert _wait_no_pending_uploads(client, bucket) == []
        assert not store.exists("x.bin")
        s3.client.upload_part = real_upload_part  # the retry (the caller's) succeeds whole
        data = os.urandom(3 * PART)
        store.put("x.bin", data)
        assert bytes(store.get("x.bin")) == data
    finally:
        store.close()


def test_upload_past_its_deadline_is_abandoned_then_aborted(seaweed, bucket):
    store = _store(seaweed, bucket, concurrency=2, timeout_s=1.0)
    client = seaweed.client()
    s3 = store._blocking_s3
    real_upload_part = s3.client.upload_part
    release, stalled = threading.Event(), threading.Event()

    def second_part_stalls(**kwargs):
        if kwargs["PartNumber"] == 2:
            stalled.set()
            release.wait(60)
        return real_upload_part(**kwargs)

    s3.client.upload_part = second_part_stalls
    try:
        with pytest.raises(TimeoutError, match="put y.bin: no answer"):
            store.put("y.bin", os.urandom(3 * PART), timeout=1.0)
        assert stalled.is_set()
        assert not store.exists("y.bin", timeout=10)
        release.set()  # the stalled part finishes now; only then is the upload aborted
        assert _wait_no_pending_uploads(client, bucket) == []
        assert not store.exists("y.bin", timeout=10)
    finally:
        release.set()
        store.close()
