"""Write-behind: a bounded queue of encoded chunks and worker threads that persist them.

``submit`` blocks while the queue is full (back-pressure); ``flush`` waits until every queued
chunk is written. Chunks still queued are readable through :meth:`WriteBehind.pending`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

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
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._pending: dict[bytes, tuple[ChunkMeta, torch.Tensor]] = {}
        self._lock = threading.Lock()
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
        with self._lock:
            self._pending[meta.key] = (meta, payload)
        self._queue.put((meta, payload, ready))

    def has(self, key: bytes) -> bool:
        with self._lock:
            return key in self._pending

    def pending(self, key: bytes) -> tuple[ChunkMeta, torch.Tensor] | None:
        """A private copy of a queued chunk (the queued buffer is recycled once written)."""
        with self._lock:
            entry = self._pending.get(key)
            return None if entry is None else (entry[0], entry[1].clone())

    def depth(self) -> int:
        return self._queue.qsize()

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                meta, payload, ready = item
                if ready is not None:
                    ready.synchronize()
                try:
                    self._write(meta, payload)
                except Exception:  # a storage fault must not kill the writer thread
                    log.exception("write-behind of chunk %s failed", meta.key.hex())
                with self._lock:
                    self._pending.pop(meta.key, None)
                if self._release is not None:
                    self._release(payload)
            finally:
                self._queue.task_done()
