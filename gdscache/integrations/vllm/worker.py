"""The worker half: loads hits into the paged KV cache and saves new chunks in the background."""

from __future__ import annotations

import atexit
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gdscache.api import GDSCache
from gdscache.config import Config
from gdscache.integrations.vllm.layout import PagedKV
from gdscache.integrations.vllm.metadata import GDSCacheMetadata, LoadSpec, SaveSpec
from gdscache.pages import KVPages

log = logging.getLogger("vllm.gdscache")


class WorkerSide:
    """One TP rank's cache and paged-KV mover.

    Loads are synchronous in ``load`` (before the first layer runs): ``retrieve`` returns whole
    chunks across all layers, so a per-layer wait would only add synchronisation. Saves run on
    one background thread; the scheduler keeps those blocks until ``finished`` reports the request.
    Both hand gdscache the request's blocks as pages (codecs with kernels read and write them in
    place), or gather and scatter when the layers are separate allocations.
    """

    def __init__(self, config: Config, pager: PagedKV) -> None:
        self.cache = GDSCache(config)
        self.pager = pager
        self.block_size = pager.fmt.block_size
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdscache-save")
        self._stream = torch.cuda.Stream(pager.device) if pager.device.type == "cuda" else None
        self._lock = threading.Lock()
        self._saves: dict[str, list[Future[None]]] = {}
        self._finished: set[str] = set()
        self._load_errors: set[int] = set()
        self._closed = False
        atexit.register(self.close)

    # ------------------------------------------------------------------ loads
    def load(self, meta: GDSCacheMetadata) -> None:
        for spec in meta.loads:
            self._load_one(spec)

    def _load_one(self, spec: LoadSpec) -> None:
        pager, bs = self.pager, self.block_size
        blocks = spec.block_ids[: -(-spec.end // bs)]
        staged = False
        try:
            # blocks before ``start`` hold KV the engine computed (maybe shared with other requests): never written
            out = pager.pages(blocks, skip_blocks=spec.start // bs)
            staged = out is None
            if staged:
                out = torch.empty((pager.num_layers, 2, spec.end, pager.fmt.num_kv_heads, pager.fmt.head_size),
                                  dtype=pager.dtype, device=pager.device)
            n_read = self.cache.retrieve(spec.token_ids, out)
        except Exception:  # a storage fault is a miss, never a crash
            log.exception("gdscache: loading %d tokens of request %s failed", spec.end, spec.req_id)
            n_read = 0
        good = max(spec.start, min(n_read, spec.end) // bs * bs)
        if staged and good > spec.start:
            pager.scatter(spec.block_ids[spec.start // bs : good // bs], out[:, :, spec.start : good])
        if good < spec.end:
            bad = spec.block_ids[good // bs : -(-spec.end // bs)]
            log.warning(
                "gdscache: request %s: loaded %d of %d hit tokens; %d blocks will be recomputed",
                spec.req_id, good - spec.start, spec.end - spec.start, len(bad),
            )
            self._load_errors.update(bad)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ saves
    def save(self, meta: GDSCacheMetadata) -> None:
        """Queue this step's saves; the blocks stay allocated until ``finished`` reports them."""
        if not meta.saves:
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        for spec in meta.saves:
            job = self._saver.submit(self._save_one, spec, ready)
            with self._lock:
                self._saves.setdefault(spec.req_id, []).append(job)

    def _save_one(self, spec: SaveSpec, ready: torch.cuda.Event | None) -> None:
        try:
            if self._stream is not None and ready is not None:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    self.cache.store(spec.token_ids, self._blocks(spec.block_ids))
                self._stream.synchronize()
            else:
                self.cache.store(spec.token_ids, self._blocks(spec.block_ids))
        except Exception:  # a failed save is a future miss, never a crash
            log.exception("gdscache: saving %d tokens of request %s failed", len(spec.token_ids), spec.req_id)

    def _blocks(self, block_ids: list[int]) -> KVPages | torch.Tensor:
        """The blocks to save: as pages, or gathered when the layers are separate allocations."""
        pages = self.pager.pages(block_ids)
        return pages if pages is not None else self.pager.gather(block_ids)

    def wait_for(self, req_ids: set[str]) -> None:
        """Block until the saves of ``req_ids`` have read their blocks (preempted requests)."""
        with self._lock:
            jobs = [job for req_id in req_ids for job in self._saves.get(req_id, ())]
        for job in jobs:
            job.result()

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests vLLM finished whose saves are all done: their blocks may be freed now."""
        with self._lock:
            self._finished.update(finished_req_ids & self._saves.keys())
            done = {r for r in self._finished if all(job.done() for job in self._saves[r])}
            for req_id in done:
                del self._saves[req_id]
            self._finished -= done
        return done

    def close(self) -> None:
        """Finish queued saves and flush the cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._saver.shutdown(wait=True)
        self.cache.close()
        atexit.unregister(self.close)
