"""The write-behind queue on its own: back-pressure counted in chunks, batches published by their own callable,
pending chunks readable until written, and a failing write that leaves the queue working."""

from __future__ import annotations

import threading
import time

import torch

from gdscache.format.chunkfile import make_meta
from gdscache.spec import KVSpec
from gdscache.writeback import WriteBehind

SPEC = KVSpec(1, 2, 1, 4, torch.float16)


def _chunk(i: int) -> tuple:
    payload = torch.full((64,), i, dtype=torch.uint8)
    return make_meta(bytes([i]) * 32, b"n" * 32, SPEC, 4, "raw", {}, payload), payload


def _held(gate: threading.Event, calls: list[str], name: str):
    def publish() -> None:
        gate.wait(30)
        calls.append(name)
    return publish


def _submit_in_thread(fn, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args)
    thread.start()
    return thread


def test_a_batch_is_pending_until_its_publish_returns():
    gate, calls, written = threading.Event(), [], []
    queue = WriteBehind(lambda meta, payload: written.append(meta.key), depth=8, workers=2)
    chunks = [_chunk(i) for i in range(3)]
    queue.submit_batch([m for m, _ in chunks], [p for _, p in chunks], _held(gate, calls, "batch"))
    assert queue.depth() == 3 and all(queue.has(m.key) for m, _ in chunks)
    meta, copy = queue.pending(chunks[1][0].key)
    assert meta is chunks[1][0] and torch.equal(copy, chunks[1][1]) and copy.data_ptr() != chunks[1][1].data_ptr()
    gate.set()
    queue.flush()
    assert calls == ["batch"] and written == [] and queue.depth() == 0
    assert not any(queue.has(m.key) for m, _ in chunks)
    queue.close()


def test_back_pressure_counts_chunks_and_a_large_batch_goes_alone():
    gate, calls = threading.Event(), []
    queue = WriteBehind(lambda meta, payload: calls.append("chunk"), depth=4, workers=4)
    big = [_chunk(i) for i in range(6)]  # more than depth: admitted since nothing is in flight
    queue.submit_batch([m for m, _ in big], [p for _, p in big], _held(gate, calls, "big"))
    assert queue.depth() == 6
    waiting = _submit_in_thread(queue.submit, *_chunk(10))
    waiting.join(0.5)
    assert waiting.is_alive() and queue.depth() == 6  # no room until the big batch is written
    gate.set()
    waiting.join(30)
    queue.flush()
    assert calls == ["big", "chunk"] and queue.depth() == 0
    queue.close()


def test_batches_fill_the_depth_together_then_wait():
    gate, calls = threading.Event(), []
    queue = WriteBehind(lambda meta, payload: None, depth=4, workers=4)
    first, second, third = [_chunk(i) for i in (0, 1)], [_chunk(i) for i in (2, 3)], _chunk(4)
    for name, chunks in (("first", first), ("second", second)):
        queue.submit_batch([m for m, _ in chunks], [p for _, p in chunks], _held(gate, calls, name))
    assert queue.depth() == 4
    seen_when_third_ran = []
    waiting = _submit_in_thread(queue.submit_batch, [third[0]], [third[1]],
                                lambda: seen_when_third_ran.append(list(calls)))
    waiting.join(0.5)
    assert waiting.is_alive()
    gate.set()
    waiting.join(30)
    queue.flush()
    assert sorted(calls) == ["first", "second"] and queue.depth() == 0
    assert len(seen_when_third_ran) == 1 and seen_when_third_ran[0]  # admitted only once a batch had been written
    queue.close()


def test_a_key_stored_twice_stays_pending_until_its_last_batch_is_written():
    first_gate, second_gate, calls = threading.Event(), threading.Event(), []
    queue = WriteBehind(lambda meta, payload: None, depth=8, workers=2)
    meta, payload = _chunk(7)
    again = torch.full_like(payload, 99)
    queue.submit_batch([meta], [payload], _held(first_gate, calls, "first"))
    queue.submit_batch([meta], [again], _held(second_gate, calls, "second"))
    first_gate.set()
    deadline = time.monotonic() + 30
    while queue.depth() != 1 and time.monotonic() < deadline:  # the first batch is written
        time.sleep(0.01)
    assert calls == ["first"] and queue.depth() == 1
    assert queue.has(meta.key) and torch.equal(queue.pending(meta.key)[1], again)  # the second batch's
    second_gate.set()
    queue.flush()
    assert not queue.has(meta.key) and queue.depth() == 0
    queue.close()


def test_a_store_waiting_for_room_gives_up_when_the_queue_closes():
    gate, calls, errors = threading.Event(), [], []
    queue = WriteBehind(lambda meta, payload: None, depth=2, workers=1)
    big = [_chunk(i) for i in range(2)]
    queue.submit_batch([m for m, _ in big], [p for _, p in big], _held(gate, calls, "big"))
    late = _chunk(5)

    def submit_late() -> None:
        try:
            queue.submit_batch([late[0]], [late[1]], lambda: calls.append("late"))
        except RuntimeError as exc:
            errors.append(exc)

    waiting = _submit_in_thread(submit_late)
    waiting.join(0.3)
    closing = _submit_in_thread(queue.close)
    waiting.join(30)
    assert len(errors) == 1 and "closed" in str(errors[0])
    assert not queue.has(late[0].key)
    gate.set()
    closing.join(30)
    assert not closing.is_alive() and calls == ["big"] and queue.depth() == 0


def test_a_failing_publish_is_logged_and_the_queue_goes_on(caplog):
    released = []
    queue = WriteBehind(lambda meta, payload: None, depth=4, workers=1, release=released.append)
    bad = [_chunk(0), _chunk(1)]

    def fail() -> None:
        raise OSError(5, "disk gone")

    queue.submit_batch([m for m, _ in bad], [p for _, p in bad], fail)
    queue.submit(*_chunk(2))
    queue.flush()
    assert "write-behind of 2 chunk(s)" in caplog.text and queue.depth() == 0
    assert len(released) == 3 and not queue.has(bad[0][0].key)
    queue.close()
