"""Write-behind: encoded chunks on their way to disk after ``store()`` has returned, and the threads that persist them.

Two kinds of work are queued: single chunks (``submit``: a worker writes each), and batches whose files the caller
has already started (``submit_batch``: a worker runs the batch's ``publish``, which waits for its writes and
publishes them). Both block until their chunks fit in ``depth`` chunks queued or being written (back-pressure; a
batch larger than ``depth`` waits until nothing is in flight); ``flush`` waits until every queued chunk is written.
Chunks not written yet are readable through :meth:`WriteBehind.pending`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

import torch

from gdscache.format.chunkfile import ChunkMeta

log = logging.getLogger(__name__)
Writer = Callable[[ChunkMeta, torch.Tensor], object]
Release = Callable[[torch.Tensor], None]
_STOP = object()


class WriteBehind:
    def __init__(self, write: Writer, *, depth: int, workers: int, release: Release | None = None) -> None:
        """``write(meta, payload)`` persists a chunk; ``release(payload)`` runs once nothing can read it."""
        self._write = write
        self._release = release
        self._depth = depth
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict[bytes, tuple[ChunkMeta, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._in_flight = 0  # chunks queued or being written (under the lock)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"gdscache-writer-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def submit(self, meta: ChunkMeta, payload: torch.Tensor) -> None:
        """Queue one chunk; a CUDA payload is written once the work queued before it has run."""
        ready = None
        if payload.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(payload.device))
        self._enqueue(((meta,), (payload,), ready, None))

    def submit_batch(self, metas: Sequence[ChunkMeta], payloads: Sequence[torch.Tensor],
                     publish: Callable[[], object]) -> None:
        """Queue chunks whose writes are already under way: a worker calls ``publish()``, which must return once they
        are published (or failed); until then they stay readable here. Their payloads must not change. Raises
        ``RuntimeError`` (nothing queued) once :meth:`close` has begun."""
        self._enqueue((tuple(metas), tuple(payloads), None, publish))

    def has(self, key: bytes) -> bool:
        with self._lock:
            return key in self._pending

    def pending(self, key: bytes) -> tuple[ChunkMeta, torch.Tensor] | None:
        """A private copy of a queued chunk (the queued buffer is recycled once written), made on the caller's
        current stream: a GPU buffer is not reused before that copy has run."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                return None
            meta, payload = entry
            copy = payload.clone()
            if payload.is_cuda:
                payload.record_stream(torch.cuda.current_stream(payload.device))
            return meta, copy

    def depth(self) -> int:
        """Chunks queued or being written."""
        with self._lock:
            return self._in_flight

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        with self._room:  # a store still waiting for room gives up rather than queue work no thread would run
            self._closed = True
            self._room.notify_all()
        self.flush()
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _enqueue(self, item: tuple) -> None:
        """Wait for room for ``item``'s chunks (unless nothing is in flight: a batch larger than ``depth`` goes
        alone), then hold them as pending and queue ``item``; all or nothing, even when interrupted."""
        metas, payloads = item[0], item[1]
        with self._room:
            self._room.wait_for(lambda: self._closed or not self._in_flight
                                or self._in_flight + len(metas) <= self._depth)
            if self._closed:
                raise RuntimeError("the write-behind queue is closed")
            queued = False
            try:
                self._in_flight += len(metas)
                for meta, payload in zip(metas, payloads, strict=True):
                    self._pending[meta.key] = (meta, payload)
                self._queue.put(item)  # unbounded: never blocks
                queued = True
            finally:
                if not queued:
                    self._forget(metas, payloads)

    def _forget(self, metas: Sequence[ChunkMeta], payloads: Sequence[torch.Tensor]) -> None:
        """Under the lock: these chunks are no longer in flight (a key another batch holds now stays its)."""
        for meta, payload in zip(metas, payloads, strict=True):
            if self._pending.get(meta.key, (None, None))[1] is payload:
                del self._pending[meta.key]
        self._in_flight -= len(metas)
        self._room.notify_all()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                metas, payloads, ready, publish = item
                try:
                    if publish is not None:
                        publish()
                    else:
                        if ready is not None:
                            ready.synchronize()
                        self._write(metas[0], payloads[0])
                except Exception:  # a storage fault must not kill the writer thread
                    log.exception("write-behind of %d chunk(s) from %s failed", len(metas), metas[0].key.hex())
                with self._room:
                    self._forget(metas, payloads)
                if self._release is not None:
                    for payload in payloads:
                        self._release(payload)
            finally:
                self._queue.task_done()
