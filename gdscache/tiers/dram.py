"""The DRAM tier: encoded chunks in (pinned, where CUDA exists) host memory, LRU under a byte quota."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from gdscache.format.chunkfile import ChunkMeta
from io_backends.buffers import aligned_empty


class DramTier:
    """An in-process LRU of ``key -> (meta, payload)``; payloads live in host memory."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"DRAM tier needs a positive byte quota, got {max_bytes}")
        self.max_bytes = max_bytes
        self.pinned = torch.cuda.is_available()
        self._entries: OrderedDict[bytes, tuple[ChunkMeta, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: bytes) -> tuple[ChunkMeta, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def get_many(self, keys: Sequence[bytes]) -> list[tuple[ChunkMeta, torch.Tensor]]:
        """The entries of the leading ``keys`` held here, up to the first one that is not (one lock for all)."""
        found = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    break
                self._entries.move_to_end(key)
                found.append(entry)
        return found

    def put(self, key: bytes, meta: ChunkMeta, payload: torch.Tensor) -> None:
        """Keep a host copy of ``payload`` (a chunk larger than the quota is not kept)."""
        size = payload.numel()
        if size > self.max_bytes or key in self:
            return
        host = aligned_empty(size, pin=self.pinned)  # an ordinary tensor even when the caller is in inference_mode
        host.copy_(payload)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (meta, host)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.numel()
                self.evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"dram_chunks": len(self._entries), "dram_bytes": self._bytes, "dram_evictions": self.evictions}
