"""GDSCache: the engine-agnostic store / lookup / retrieve API over the DRAM, local and remote tiers."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, NamedTuple, Self

import numpy as np
import torch

from gdscache import keys
from gdscache.codecs import Codec, get_codec
from gdscache.config import Config
from gdscache.format.checksum import algorithm_for, digests
from gdscache.format.chunkfile import ChunkMeta, make_meta
from gdscache.metrics import Metrics, start_metrics_server
from gdscache.pages import KVPages, token_slice
from gdscache.spec import KVSpec, dtype_name, parse_dtype
from gdscache.tiers.dram import DramTier
from gdscache.tiers.local import ChunksInFlight, LocalTier, thread_stream
from gdscache.writeback import WriteBehind
from io_backends import make_file_backend
from io_backends.base import Rows
from io_backends.buffers import host_pool

log = logging.getLogger("gdscache")
GROUP_CHUNKS = 64
GROUP_BYTES = 128 << 20
"""On a GPU, chunks are fetched up to ``GROUP_BYTES`` (at most ``GROUP_CHUNKS``, at least one chunk) per I/O task:
one batched local-tier read (every file's reads in flight), one checksum sync and one decode call per group (the
size also bounds a store's encode batches: ``STORE_BATCHES``). One task per chunk spent most of its time in CUDA
and Python calls contending across the I/O threads: with 8 threads, warm reads of 1 MiB chunks ran at 0.8 GB/s one
per task and 5.1 in groups of 128, of 32 MiB chunks at 19.9 and 27.4 in groups of 4
(benchmarks/gpu_fetch_groups.py, benchmarks/RESULTS.md). Since groups are pipelined (``PIPELINE_GROUPS``), a warm
retrieve of 128 x 1 MiB chunks ran at 15.7-18.5 GB/s in groups of 64 against 13.5-14.6 in one group of 128."""
PIPELINE_GROUPS = 3
"""On a GPU, a retrieve whose backend reads into GPU memory in the background (``FileBackend.reads_in_background``)
runs its fetch tasks on its own thread, at least this many groups' reads in flight (more where that keeps fewer than
``io_threads`` files in flight): while the I/O threads read the next groups, this one verifies and decodes the last.
Tasks on a pool of Python threads instead took turns for the GIL: there, 128 x 1 MiB chunks in groups of 32 read at
10.4 GB/s, in one group at 13.3 (benchmarks/RESULTS.md)."""
INFLIGHT_BYTES = 512 << 20
"""On a GPU, fetch tasks in flight cover at most about this many bytes of KV (at least two tasks); a codec that
decodes in batches holds up to as many again awaiting its decode."""
STORE_BATCHES = 4
"""A store of GPU KV through the POSIX backend (a GPU backend takes ``GDSCache._store_together`` instead) encodes its
chunks in up to this many batches (more where they exceed ``GROUP_BYTES`` each; one for a codec that batches its
kernels), so that writing one batch overlaps encoding and checksumming the next."""
Tokens = Sequence[int] | np.ndarray | torch.Tensor
KV = torch.Tensor | KVPages
"""A ``[num_layers, kv_planes, num_tokens, num_kv_heads, head_dim]`` tensor, or an engine's pages standing in for one."""
FetchJob = "Future[list[Fetched]] | _Started"
"""A fetch task: on a pool (a future) or begun on the caller's thread."""
Payload = torch.Tensor | list[torch.Tensor]
"""An encoded chunk: one buffer, or consecutive runs of one (a raw host chunk straight from the caller's tensor)."""


class Fetched(NamedTuple):
    """One chunk found in a tier. ``owned`` payloads were read for this call alone and may be recycled; a None
    payload is already in the destination (read or decoded there). ``ready``: on a GPU, the end of an I/O
    thread's write into the destination (done, or tried and failed)."""

    meta: ChunkMeta
    payload: torch.Tensor | None
    owned: bool
    ready: torch.cuda.Event | None = None


class GDSCache:
    """A KV-cache store keyed by token prefixes.

    ``GDSCache(path=..., chunk_size=..., model_id=...)`` or ``GDSCache(Config(...))``. Safe to use
    from several threads; several processes may share one path.
    """

    def __init__(self, config: Config | None = None, /, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError("pass either a Config or keyword fields, not both")
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"GDSCache() takes a gdscache.Config, got {type(config).__name__}")
        self.config = config if config is not None else Config.build(fields)
        cfg = self.config
        _check_writable(cfg.path)
        self.metrics = Metrics()
        self._codec: Codec = get_codec(cfg.codec, **_codec_kwargs(cfg))
        self._codec_params = self._codec.params()  # fixed with the codec; in every chunk written and read
        self._backend = make_file_backend(cfg.storage, cfg.io_threads, cfg.o_direct, cfg.path)
        self._local = LocalTier(cfg.path, self._backend, max_bytes=cfg.max_disk_bytes, durable=cfg.durable)
        self._dram = DramTier(cfg.cpu_cache_bytes) if cfg.cpu_cache_bytes else None
        self._remote = _make_remote(cfg)
        self._remote_pool = (ThreadPoolExecutor(cfg.remote_concurrency, thread_name_prefix="gdscache-remote")
                             if self._remote is not None else None)
        self._writer = (
            WriteBehind(self._persist, depth=cfg.write_queue_depth, workers=cfg.io_threads, release=self._recycle)
            if cfg.write_mode == "async" else None
        )
        self._spec_lock = threading.Lock()
        # a retrieve into a GPU runs its fetch tasks on its caller's thread: at most io_threads such retrieves at once
        # (beyond, on the pool), as each holds up to PIPELINE_GROUPS groups' payloads on the GPU
        self._inline_slots = threading.BoundedSemaphore(cfg.io_threads)
        self._spec: KVSpec | None = None
        self._namespace = b""
        self._closed = False
        if cfg.kv_shape is not None:
            shape = cfg.kv_shape
            self._bind(KVSpec(shape.num_layers, shape.kv_planes, shape.num_kv_heads, shape.head_dim, parse_dtype(shape.dtype)))
        self._metrics_server = (
            start_metrics_server(cfg.metrics_port, self.metrics, self.stats) if cfg.metrics_port is not None else None
        )
        log.info("gdscache at %s: storage=%s io_mode=%s batch_reads=%s batch_writes=%s codec=%s", cfg.path,
                 cfg.storage, self.io_mode, self._backend.batch_reads, self._backend.batch_writes, cfg.codec)

    # ------------------------------------------------------------------ public API
    @property
    def io_mode(self) -> str:
        """The I/O path that actually runs (gds, cufile-compat, kvikio-posix, posix-odirect, posix-buffered)."""
        return self._backend.io_mode

    @property
    def metrics_port(self) -> int | None:
        """The port serving Prometheus metrics (useful with ``metrics_port=0``), or None."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def namespace(self) -> bytes:
        """Digest of the fingerprint (model, dtype, shape, layout, TP, codec) that seeds every key."""
        if self._spec is None:
            raise RuntimeError("no KV spec yet: store or retrieve a tensor first, or set Config.kv_shape")
        return self._namespace

    def chunk_keys(self, tokens: Tokens) -> list[bytes]:
        """Keys of the whole chunks of ``tokens`` under this cache's namespace."""
        return keys.chunk_keys(self.namespace, keys.as_token_array(tokens), self.config.chunk_size)

    def store(self, tokens: Tokens, kv: KV) -> int:
        """Persist the whole chunks of ``kv`` not stored yet; returns how many tokens were newly stored.

        ``kv`` may be :class:`KVPages` (every page present): the cachegen kernels then read the pages in place.
        A store that raises (say, cachegen refusing non-finite KV) does so once the writes it started have ended
        (in async mode, but for groups already handed to the write-behind threads): the chunks before the failing
        one may stay stored. In async mode the tokens returned are those accepted; ``flush()`` waits until they are
        published, and ``stats()["chunk_write_failures"]`` counts those the disk refused.
        """
        arr, spec = self._prepare(tokens, kv, "kv")
        chunk = self.config.chunk_size
        started = time.perf_counter()
        jobs: list[tuple[Future[list[bool]], list[Payload]]] = []  # each: which of its chunks were stored
        todo: list[tuple[bytes, KV]] = []  # chunks to encode
        new_tokens = together = 0
        try:
            chunk_keys = keys.chunk_keys(self._namespace, arr, chunk)
            for i, (key, present) in enumerate(zip(chunk_keys, self._present_many(chunk_keys), strict=True)):
                if present:
                    continue
                piece = token_slice(kv, i * chunk, (i + 1) * chunk)
                # sync stores of raw chunks write straight from ``kv`` (the caller waits, so it cannot change),
                # checksummed on the I/O threads in parallel rather than one by one here
                runs = self._codec.direct_runs(piece) if self._writer is None else None
                if runs is not None:
                    self.metrics.inc("bytes_encoded", sum(run.numel() for run in runs))
                    jobs.append((self._backend.submit(self._seal, key, spec, runs), [runs]))
                    continue
                todo.append((key, piece))
                if not kv.is_cuda:  # encoding on the CPU is slow: each chunk is written while the next one encodes
                    key, piece = todo.pop()
                    payload = self._codec.encode_many([piece])[0]
                    new_tokens += self._submit([self._meta(key, spec, payload)], [payload], jobs)
            group = self._group_size(spec, kv)
            if todo and group > 1:  # a GPU backend: all at once, checksummed while written
                together = len(todo)
                # each file holds a descriptor until published; in async mode a group also holds its payloads while it
                # waits for room, so it is at most as large as the room
                most = min(GROUP_CHUNKS, self.config.write_queue_depth) if self._writer is not None else GROUP_CHUNKS
                for first in range(0, len(todo), most):
                    new_tokens += self._store_together(todo[first : first + most], spec)
                todo = []
            # else on the GPU the chunks are encoded in batches (fuller kernel launches) and checksummed (one host
            # sync per batch); each batch goes to the I/O threads in groups (one task each: its files in flight
            # together, then fsynced in parallel) before the next batch encodes, so that writing overlaps encoding
            for start, stop in self._encode_batches(len(todo), spec):
                batch = todo[start:stop]
                payloads = self._codec.encode_many([piece for _, piece in batch])
                sums = digests(payloads, [algorithm_for(p) for p in payloads])
                metas = [self._meta(key, spec, p, digest)
                         for (key, _), p, digest in zip(batch, payloads, sums, strict=True)]
                for first in range(0, len(metas), group):
                    new_tokens += self._submit(metas[first : first + group], payloads[first : first + group], jobs)
        except BaseException:
            for job, _ in jobs:  # a store that fails returns once the writes it started have ended (a prefix may stay)
                with contextlib.suppress(Exception):
                    job.result()
            raise
        for job, held in jobs:
            new_tokens += chunk * sum(job.result())
            for payload in held:
                if not isinstance(payload, list):
                    self._recycle(payload)
        if jobs or new_tokens:
            chunks_sent = together + sum(len(held) for _, held in jobs)
            self.metrics.observe("store", (time.perf_counter() - started) / max(1, chunks_sent or new_tokens // chunk))
        self.metrics.inc("stored_tokens", new_tokens)
        return new_tokens

    def _store_together(self, todo: list[tuple[bytes, KV]], spec: KVSpec) -> int:
        """Encode every chunk of ``todo``, start writing their payloads, checksum them while the writes are in
        flight, then publish them together and hand them to the other tiers; returns the tokens stored. In async
        mode the publishing is the write-behind threads' (the payloads are this call's own buffers, so ``todo``'s KV
        is free once they are encoded) and the tokens accepted are returned."""
        payloads = self._codec.encode_many([piece for _, piece in todo])
        writing = self._local.start_many(self._namespace, [(key, p) for (key, _), p in zip(todo, payloads, strict=True)])
        try:
            sums = digests(payloads, [algorithm_for(p) for p in payloads])
            metas = [self._meta(key, spec, p, digest) for (key, _), p, digest in zip(todo, payloads, sums, strict=True)]
            self.metrics.inc("bytes_encoded", sum(meta.payload_len for meta in metas))
            if self._writer is not None:  # waits while the queue is full, this group's writes going on meanwhile
                self._writer.submit_batch(metas, payloads, lambda: self._publish(writing, metas, payloads))
                return self.config.chunk_size * len(metas)
        except BaseException:
            writing.abandon()
            raise
        stored = self._publish(writing, metas, payloads)
        for payload in payloads:
            self._recycle(payload)
        return self.config.chunk_size * sum(stored)

    def _publish(self, writing: ChunksInFlight, metas: list[ChunkMeta], payloads: list[torch.Tensor]) -> list[bool]:
        """Publish chunks whose writes :meth:`_store_together` started, and hand them to the other tiers; per chunk,
        whether some tier now holds it."""
        return self._to_other_tiers(metas, payloads, writing.finish(metas))

    def _submit(self, metas: list[ChunkMeta], payloads: list[torch.Tensor],
                jobs: list[tuple[Future[list[bool]], list[Payload]]]) -> int:
        """Queue encoded chunks for writing: to the write-behind queue (tokens accepted, returned) or to the I/O pool
        as one job in ``jobs`` (0 returned)."""
        self.metrics.inc("bytes_encoded", sum(meta.payload_len for meta in metas))
        if self._writer is not None:
            for meta, payload in zip(metas, payloads, strict=True):
                self._writer.submit(meta, payload)
            return self.config.chunk_size * len(metas)
        jobs.append((self._backend.submit(self._persist_many, metas, payloads), payloads))
        return 0

    def lookup(self, tokens: Tokens) -> int:
        """Length of the longest stored prefix of ``tokens``, a multiple of ``chunk_size``."""
        self._check_open()
        hits = 0
        for key in self.chunk_keys(tokens):
            if not (self._present(key) or (self._remote is not None and self._remote.contains(self._namespace, key))):
                break
            hits += 1
        self.metrics.inc("lookups")
        return hits * self.config.chunk_size

    def retrieve(self, tokens: Tokens, out: KV) -> int:
        """Fill ``out[:, :, :n]`` with the KV of the longest retrievable prefix; returns ``n``.

        A chunk that is missing, corrupt or unreadable ends the prefix: ``out`` beyond ``n`` is
        unspecified, and nothing before ``n`` is ever wrong. ``out`` may be :class:`KVPages`: the
        cachegen kernels then write the pages in place, and skipped pages (id -1) are left alone.
        """
        arr, spec = self._prepare(tokens, out, "out")
        chunk = self.config.chunk_size
        started = time.perf_counter()
        chunk_keys = keys.ChunkKeys(self._namespace, arr, chunk)  # hashed group by group, as their reads start
        group = self._group_size(spec, out)
        inflight: list[tuple[FetchJob, Sequence[KV]]] = []  # each: its chunks' views of ``out``
        batch: list[Fetched] = []  # fetched in order, not yet counted (or decoded): chunks n_read, n_read + 1, ...
        # a codec that gains nothing from decoding chunks together decodes each on its I/O thread, in parallel
        decode_here = not (self._codec.batches and out.is_cuda)
        written: list[torch.cuda.Event] = []  # I/O threads' writes into ``out``: the caller's stream waits for all

        def take(job: FetchJob) -> list[Fetched]:
            found = job.result()
            written.extend(_distinct_events(fetched.ready for fetched in found))
            return found

        n_read = next_submit = self._dram_prefix(chunk_keys, out, spec)
        # fetch tasks run on this thread (no hop to an I/O thread and back, no other Python thread to take turns with
        # for the GIL) where there is one, or where the backend reads into the GPU in the background: then a few
        # groups are in flight, the next ones read while this thread verifies and decodes the last (PIPELINE_GROUPS)
        left = len(chunk_keys) - n_read
        pipelined = out.is_cuda and self._backend.reads_in_background
        here = 0 < left and (left <= group or pipelined) and self._inline_slots.acquire(blocking=False)
        # I/O threads write into ``out`` only after the work the caller has queued on it so far (the DRAM prefix's
        # copies too); this thread decodes on the caller's stream, after that work already
        after = None
        if left and out.is_cuda and decode_here and not here:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(out.device))
        window = max(2, 2 * self.config.io_threads)  # fetch tasks in flight
        if out.is_cuda:
            window = max(2, min(window, INFLIGHT_BYTES // (group * spec.bytes_per_token() * chunk)))
        if here:  # at least io_threads files in flight where memory allows (a cold file is read by one I/O thread)
            window = max(PIPELINE_GROUPS, min(window, -(-self.config.io_threads // group)))
        stopped = False
        try:
            while not stopped and (inflight or next_submit < len(chunk_keys)):
                while next_submit < len(chunk_keys) and len(inflight) < window:
                    end = min(next_submit + group, len(chunk_keys))
                    views = self._chunk_views(out, next_submit, end - next_submit)
                    task = (chunk_keys[next_submit:end], views, spec, after, decode_here)
                    job = _Started(self._start_fetch_group, *task) if here else \
                        self._backend.submit_read(self._fetch_group, *task)
                    inflight.append((job, views))
                    next_submit = end
                job, views = inflight.pop(0)
                found = take(job)
                batch += found
                stopped = len(found) < len(views)  # a miss ends the prefix
                # on the CPU each chunk counts as it arrives; on the GPU the chunks of all the tasks in flight at
                # once, decoded by one codec call where the codec batches (fuller kernels), bounding the payloads held
                last = not inflight and next_submit == len(chunk_keys)
                if batch and (stopped or last or not out.is_cuda or len(batch) >= window * group):
                    done = self._decode_prefix(batch, spec, out, n_read)
                    n_read, stopped, batch = n_read + done, stopped or done < len(batch), []
        finally:
            self._drain([job for job, _ in inflight], take, recycle=not out.is_cuda)
            if here:
                self._inline_slots.release()
            if written:
                caller = torch.cuda.current_stream(out.device)
                for event in written:
                    caller.wait_event(event)
        misses = len(chunk_keys) - n_read
        self.metrics.inc("hit_chunks", n_read)
        self.metrics.inc("miss_chunks", misses)
        self.metrics.inc("retrieved_tokens", n_read * chunk)
        if n_read:
            self.metrics.observe("retrieve", (time.perf_counter() - started) / n_read)
        return n_read * chunk

    def _dram_prefix(self, chunk_keys: Sequence[bytes], out: KV, spec: KVSpec) -> int:
        """Decode the leading chunks that the DRAM tier holds into a GPU ``out`` by one codec call on the caller's
        stream (``raw``: copy engines straight from pinned memory), with no I/O thread; how many. The rest, and any
        chunk this cannot take, go the usual way."""
        if self._dram is None or isinstance(out, KVPages) or not out.is_cuda or not self._codec.decodes_from_host or \
                not chunk_keys or chunk_keys[0] not in self._dram:  # one key hashed where the first chunk is not here
            return 0
        hits = self._dram.get_many(chunk_keys[:])  # every key hashed first, not under the tier's lock
        usable = 0
        while usable < len(hits) and self._same_settings(hits[usable][0], spec):
            usable += 1
        if not usable or not self._codec.decode_run([payload for _, payload in hits[:usable]], spec,
                                                     self.config.chunk_size, out, 0):
            return 0
        self.metrics.inc("dram_hits", usable)
        self.metrics.inc("bytes_read", sum(meta.payload_len for meta, _ in hits[:usable]))
        return usable

    def prefetch(self, tokens: Tokens) -> Future[int]:
        """Warm the longest available prefix of ``tokens`` ahead of use, in the background.

        Chunks only in the remote tier are fetched (and verified) into the local tier; with a DRAM
        tier, local chunks are promoted into it. The future gives the prefix length now held locally.
        """
        self._check_open()
        return self._backend.submit(self._prefetch, self.chunk_keys(tokens))

    def _prefetch(self, chunk_keys: list[bytes]) -> int:
        warmed = 0
        for key in chunk_keys:
            in_dram = self._dram is not None and key in self._dram
            if not in_dram and not self._local.contains(self._namespace, key):
                hit = self._remote.get(self._namespace, key) if self._remote is not None else None
                if hit is None or not self._local.write(self._namespace, *hit):
                    break
                self.metrics.inc("prefetched_chunks")
            if self._dram is not None and not in_dram:
                hit = self._local.read(self._namespace, key, torch.device("cpu"))
                if hit is None:
                    break
                self._dram.put(key, *hit)
                self._recycle(hit[1])
            warmed += 1
        return warmed * self.config.chunk_size

    def flush(self) -> None:
        """Wait until every accepted chunk is written (async mode) and uploaded (remote tier)."""
        if self._writer is not None:
            self._writer.flush()
        if self._remote is not None:
            self._remote.flush()

    def close(self) -> None:
        """Flush, then release threads and handles. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._writer is not None:
            self._writer.close()
        if self._remote_pool is not None:
            self._remote_pool.shutdown(wait=True)
        if self._remote is not None:
            self._remote.close()
        self._backend.close()

    def stats(self) -> dict[str, Any]:
        """Counters, bytes, hit/miss totals, latencies, the I/O mode that runs and what carries batches of reads and
        writes."""
        out: dict[str, Any] = {
            "io_mode": self.io_mode,
            "batch_reads": self._backend.batch_reads,
            "batch_writes": self._backend.batch_writes,
            "storage": self.config.storage,
            "codec": self._codec.name,
            "chunk_size": self.config.chunk_size,
            "local_chunks": len(self._local),
            "local_bytes": self._local.used_bytes,
        }
        out.update(self.metrics.snapshot())
        out.update({f"local_{k}": v for k, v in vars(self._local.stats).items()})
        if self._dram is not None:
            out.update(self._dram.stats())
        if self._writer is not None:
            out["write_queue_depth"] = self._writer.depth()
        if self._remote is not None:
            out.update({f"remote_{k}": v for k, v in self._remote.stats().items()})
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GDSCache(path={self.config.path!r}, codec={self._codec.name!r}, io_mode={self.io_mode!r})"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GDSCache is closed")

    def _prepare(self, tokens: Tokens, tensor: KV, name: str) -> tuple[np.ndarray, KVSpec]:
        """Validate ``tokens`` and a KV tensor or pages (``kv`` or ``out``) that must hold all their whole chunks."""
        self._check_open()
        arr = keys.as_token_array(tokens)
        spec = KVSpec.of(tensor, name)
        if isinstance(tensor, KVPages):
            if self.config.chunk_size % tensor.page_tokens:
                raise ValueError(f"chunk_size {self.config.chunk_size} is not a whole number of "
                                 f"{tensor.page_tokens}-token pages")
            if name == "kv" and not tensor.complete:
                raise ValueError("kv pages to store include skipped pages (page id -1)")
        self._bind(spec, name)
        whole = len(arr) // self.config.chunk_size * self.config.chunk_size
        if tensor.shape[2] < whole:
            raise ValueError(
                f"{name} holds {tensor.shape[2]} tokens but tokens has {whole} in whole chunks of "
                f"{self.config.chunk_size}; {name} shape {tuple(tensor.shape)}"
            )
        return arr, spec

    def _bind(self, spec: KVSpec, name: str = "kv") -> None:
        """Fix the KV spec (and so the namespace) on first use; later tensors (the caller's ``name``) must match it."""
        if self._spec == spec:
            return
        with self._spec_lock:
            if self._spec is None:
                cfg = self.config
                fp = keys.fingerprint(
                    model_id=cfg.model_id, spec=spec, layout=cfg.layout, tp_rank=cfg.tp_rank, tp_size=cfg.tp_size,
                    chunk_size=cfg.chunk_size, codec=self._codec.name, codec_params=self._codec_params,
                )
                self._namespace = keys.namespace_of(fp)
                self._local.ensure_namespace(self._namespace, fp)
                if self._remote is not None:
                    self._remote.put_namespace_info(self._namespace, fp)
                self._spec = spec
            elif self._spec != spec:
                have, got = self._spec, spec
                raise ValueError(
                    f"{name} does not match this cache's KV: expected [layers={have.num_layers}, planes={have.kv_planes}, "
                    f"tokens, heads={have.num_kv_heads}, dim={have.head_dim}] {dtype_name(have.dtype)}, got "
                    f"[{got.num_layers}, {got.kv_planes}, tokens, {got.num_kv_heads}, {got.head_dim}] {dtype_name(got.dtype)}"
                )

    def _present_many(self, chunk_keys: list[bytes]) -> list[bool]:
        """:meth:`_present` for each key, the local tier asked once for all that the others lack."""
        present = [(self._writer is not None and self._writer.has(key)) or (self._dram is not None and key in self._dram)
                   for key in chunk_keys]
        rest = [i for i, found in enumerate(present) if not found]
        for i, found in zip(rest, self._local.contains_many(self._namespace, [chunk_keys[i] for i in rest]), strict=True):
            present[i] = found
        return present

    def _present(self, key: bytes) -> bool:
        return self._present_many([key])[0]

    def _meta(self, key: bytes, spec: KVSpec, payload: torch.Tensor | list[torch.Tensor],
              digest: bytes | None = None) -> ChunkMeta:
        return make_meta(key, self._namespace, spec, self.config.chunk_size, self._codec.name, self._codec_params,
                         payload, digest)

    def _seal(self, key: bytes, spec: KVSpec, runs: list[torch.Tensor]) -> list[bool]:
        """Checksum a raw host chunk given as runs of the caller's tensor, then persist it."""
        return self._persist_many([self._meta(key, spec, runs)], [runs])

    def _persist(self, meta: ChunkMeta, payload: Payload) -> bool:
        """Write one encoded chunk to every tier; never raises for storage faults."""
        return self._persist_many([meta], [payload])[0]

    def _persist_many(self, metas: list[ChunkMeta], payloads: list[Payload]) -> list[bool]:
        """Write encoded chunks to every tier (to the local one together); never raises for storage faults."""
        return self._to_other_tiers(metas, payloads,
                                    self._local.write_many(self._namespace, list(zip(metas, payloads, strict=True))))

    def _to_other_tiers(self, metas: list[ChunkMeta], payloads: list[Payload], stored: list[bool]) -> list[bool]:
        """Count the local tier's results (``stored``) and put the chunks into the DRAM and remote tiers; per chunk,
        whether some tier now holds it."""
        uploads = []
        for k, (meta, payload) in enumerate(zip(metas, payloads, strict=True)):
            self.metrics.inc("chunks_written" if stored[k] else "chunk_write_failures")
            if stored[k]:
                self.metrics.inc("bytes_written", meta.payload_len)
            if self._dram is not None or self._remote is not None:
                whole = torch.cat(payload) if isinstance(payload, list) else payload
                if self._dram is not None:
                    self._dram.put(meta.key, meta, whole)
                if self._remote is not None:
                    if self.config.remote_write == "through":  # a group's uploads at once: each waits for its PUT
                        uploads.append(self._remote_pool.submit(self._remote.put, self._namespace, meta.key, meta,
                                                                whole))
                    else:  # queued for the upload threads
                        self._remote.put(self._namespace, meta.key, meta, whole)
                    stored[k] = True
        for upload in uploads:
            upload.result()
        return stored

    def _group_size(self, spec: KVSpec, kv: KV) -> int:
        """Chunks per I/O task: several where the GPU backend reads or writes their files together."""
        if not (kv.is_cuda and self._backend.gpu_native):
            return 1
        return self._chunks_per_group(spec)

    def _chunks_per_group(self, spec: KVSpec) -> int:
        """How many chunks of KV fit in ``GROUP_BYTES`` (at least one, at most ``GROUP_CHUNKS``)."""
        return max(1, min(GROUP_CHUNKS, GROUP_BYTES // (spec.bytes_per_token() * self.config.chunk_size)))

    def _encode_batches(self, n: int, spec: KVSpec) -> list[tuple[int, int]]:
        """``[start, stop)`` of the batches a GPU store encodes its ``n`` chunks in: all at once for a codec whose
        kernels gain from every chunk in one launch (cachegen), else :func:`store_batches` of ``GROUP_BYTES`` each."""
        if self._codec.batches:
            return [(0, n)] if n else []
        return store_batches(n, self._chunks_per_group(spec))

    def _fetch_group(self, chunk_keys: list[bytes], targets: Sequence[KV], spec: KVSpec, after: torch.cuda.Event | None,
                     decode_here: bool) -> list[Fetched]:
        """Fetch consecutive chunks up to the first miss (local-tier reads into a GPU batched); with ``decode_here``,
        decode them on this thread (:meth:`_decode_here`)."""
        return self._start_fetch_group(chunk_keys, targets, spec, after, decode_here)()

    def _start_fetch_group(self, chunk_keys: list[bytes], targets: Sequence[KV], spec: KVSpec,
                           after: torch.cuda.Event | None, decode_here: bool) -> Callable[[], list[Fetched]]:
        """Begin :meth:`_fetch_group`: the local-tier reads into a GPU start now; the returned function (to call once,
        on this thread) waits for them and does the rest."""
        if _device_of(targets).type == "cuda" and self._backend.gpu_native:
            fetch = self._start_fetch_batched(chunk_keys, targets)
        else:
            found = self._fetch_each(chunk_keys, targets)
            fetch = lambda: (found, None)

        def finish() -> list[Fetched]:
            found, payloads = fetch()
            if decode_here:
                return self._decode_here(found, targets, spec, after, payloads)
            return found if payloads is None else _with_payloads(found, payloads)

        return finish

    def _start_fetch_batched(self, chunk_keys: list[bytes], targets: Sequence[KV]
                             ) -> Callable[[], tuple[list[Fetched], Rows | None]]:
        """Begin :meth:`_fetch` of consecutive chunks for a GPU up to the first miss: those the local tier holds, up
        to the first it does not, are read together (started now); the rest as :meth:`_fetch_each` does, when the
        returned function (to call once, on this thread) has the local tier's answers. It also gives every chunk's
        payload as rows of one view, where all were read together (:attr:`ChunksRead.payloads`), else None; where it
        does, a chunk's own ``payload`` may be None (:func:`_with_payloads` sets them)."""
        plan: list[Fetched | None] = []  # a chunk held nearer (write queue, DRAM), or None: in the local tier
        if self._writer is None and self._dram is None:  # only the local tier: one look at its index for all
            plan += [None] * sum(self._local.contains_many(self._namespace, chunk_keys, leading=True))
        else:
            for key in chunk_keys:
                near = self._fetch_near(key)
                if near is None and not self._local.contains(self._namespace, key):
                    break
                plan.append(near)
        local_keys = [key for key, near in zip(chunk_keys, plan) if near is None]
        reading = self._local.start_read_many(self._namespace, local_keys, _device_of(targets)) if local_keys else None

        def finish() -> tuple[list[Fetched], Rows | None]:
            read = reading() if reading is not None else None
            if read is not None and read.payloads is not None and len(local_keys) == len(chunk_keys) and \
                    self._dram is None:  # every chunk a hit, and no tier to promote it into
                self.metrics.inc("local_hits", len(read.metas))
                return [Fetched(meta, None, True) for meta in read.metas], read.payloads  # no view per payload
            local = iter(read.hits if read is not None else ())
            found: list[Fetched] = []
            hits = 0
            try:
                for key, fetched in zip(chunk_keys, plan):
                    if fetched is None:
                        hit = next(local)
                        if hit is not None:
                            hits += 1
                            fetched = self._promoted(key, hit, owned=True)
                        else:  # the file went bad or away since ``contains``
                            fetched = self._fetch_remote(key)
                    if fetched is None:
                        return found, None
                    found.append(fetched)
            finally:
                if hits:
                    self.metrics.inc("local_hits", hits)
            if read is not None and len(local_keys) == len(chunk_keys):
                return found, read.payloads  # every chunk read together
            return found + self._fetch_each(chunk_keys[len(plan) :], targets[len(plan) :]), None

        return finish

    def _fetch_each(self, chunk_keys: list[bytes], targets: Sequence[KV]) -> list[Fetched]:
        """:meth:`_fetch` of consecutive chunks up to the first miss; with a remote tier, several at once on its
        pool (object-store requests wait on the network), later ones dropped after a miss."""
        if self._remote_pool is None or len(chunk_keys) < 2:
            found = []
            for key, target in zip(chunk_keys, targets, strict=True):
                fetched = self._fetch(key, target)
                if fetched is None:
                    break
                found.append(fetched)
            return found
        jobs = [self._remote_pool.submit(self._fetch, key, target) for key, target in zip(chunk_keys, targets)]
        found: list[Fetched] = []
        try:
            for job in jobs:
                fetched = job.result()
                if fetched is None:
                    break
                found.append(fetched)
        finally:
            for job in jobs[len(found) + 1 :]:  # after a miss (or an error) the rest are not needed
                if not job.cancel():
                    with contextlib.suppress(Exception):
                        job.result()
        return found

    def _fetch(self, key: bytes, target: KV) -> Fetched | None:
        """Find one chunk in the fastest tier that has it, promoting it into the faster tiers.

        ``target`` is where the chunk will be decoded; a raw chunk from the local tier lands there directly.
        """
        fetched = self._fetch_near(key)
        if fetched is not None:
            return fetched
        runs = self._codec.direct_runs(target)
        if runs is not None:
            meta = self._local.read_runs(self._namespace, key, runs)
            if meta is None:
                return self._fetch_remote(key)
            self.metrics.inc("local_hits")
            if self._dram is not None:
                self._dram.put(key, meta, torch.cat(runs))
            return Fetched(meta, None, False)
        hit = self._local.read(self._namespace, key, target.device)
        if hit is None:
            return self._fetch_remote(key)
        self.metrics.inc("local_hits")
        return self._promoted(key, hit, owned=True)

    def _fetch_near(self, key: bytes) -> Fetched | None:
        """A chunk still queued for writing, or one the DRAM tier holds."""
        if self._writer is not None and (pending := self._writer.pending(key)) is not None:
            return Fetched(*pending, False)
        if self._dram is not None and (hit := self._dram.get(key)) is not None:
            self.metrics.inc("dram_hits")
            return Fetched(*hit, False)
        return None

    def _fetch_remote(self, key: bytes) -> Fetched | None:
        """A chunk from the remote tier, written through to the local one."""
        if self._remote is None or (hit := self._remote.get(self._namespace, key)) is None:
            return None
        self.metrics.inc("remote_hits")
        self._local.write(self._namespace, *hit)
        return self._promoted(key, hit, owned=False)

    def _promoted(self, key: bytes, hit: tuple[ChunkMeta, torch.Tensor], owned: bool) -> Fetched:
        """A chunk found below the DRAM tier, now also held there (when there is one)."""
        if self._dram is not None:
            self._dram.put(key, *hit)
        return Fetched(*hit, owned)

    def _drain(self, jobs: list[FetchJob], take: Callable[[FetchJob], list[Fetched]], recycle: bool) -> None:
        """Cancel the reads not started; end the others (they may write into the caller's ``out``, and a task begun on
        this thread holds its files and keys until it is ended), every one even if one is interrupted (that is
        raised once all have ended)."""
        interrupted: BaseException | None = None
        for job in jobs:
            if job.cancel():
                continue
            try:
                left = take(job)
            except Exception:  # the caller already has its answer, or its own error
                log.exception("a chunk read that was no longer needed failed")
                continue
            except BaseException as exc:  # noqa: BLE001 - raised below, once the other tasks have ended
                interrupted = interrupted or exc
                continue
            for fetched in left if recycle else ():
                if fetched.owned and fetched.payload is not None:
                    self._recycle(fetched.payload)
        if interrupted is not None:
            raise interrupted

    def _decode_here(self, found: list[Fetched], targets: Sequence[KV], spec: KVSpec, after: torch.cuda.Event | None,
                     payloads: Rows | None = None) -> list[Fetched]:
        """Decode, on this thread (an I/O thread, or the caller's where it fetches), the fetched chunks whose
        payloads are already on their target's device with one codec call: on a GPU, on an I/O thread's own stream
        after ``after`` (the caller's work on ``out``), or with ``after`` None on this thread's current stream (the
        caller's: after its work, and with nothing for it to wait for). Host payloads for a GPU (DRAM or remote hits)
        and chunks that do not decode go back as fetched, for the caller to copy in batches or to report.
        ``payloads``: every found chunk's payload as rows of one view, where they are (then no view per chunk, and a
        chunk's own ``payload`` may be None)."""
        device = _device_of(targets)  # the targets are views of one ``out``
        on_device = device.index if device.type == "cuda" else -1  # as ``get_device`` says it, without a device object
        rows = payloads if payloads is not None and payloads.stack.get_device() == on_device else None
        if payloads is not None and rows is None:
            found = _with_payloads(found, payloads)
        if rows is not None:
            todo = [i for i, fetched in enumerate(found) if self._same_settings(fetched.meta, spec)]
            if len(todo) < len(found):  # a chunk left undecoded goes back with its payload (None means decoded)
                found = _with_payloads(found, rows)
        else:
            todo = [i for i, fetched in enumerate(found) if fetched.payload is not None
                    and fetched.payload.get_device() == on_device and self._same_settings(fetched.meta, spec)]
        if not todo:
            return found
        if len(todo) == len(found):  # all of them: whole sequences, no view per chunk
            sources, dests = rows if rows is not None else [f.payload for f in found], targets[: len(found)]
        else:
            sources, dests = [found[i].payload for i in todo], [targets[i] for i in todo]
        stream = thread_stream(device) if on_device >= 0 and after is not None else None
        if on_device >= 0:  # GPU payloads come from the reading thread's stream: kept until the decoding one is done
            decoding = stream if stream is not None else torch.cuda.current_stream(device)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))  # a pending chunk's copy on this thread
                stream.wait_event(after)
            for buffer in [sources.stack] if isinstance(sources, Rows) else _buffers(sources):
                buffer.record_stream(decoding)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            errors = self._codec.decode_many(sources, spec, self.config.chunk_size, dests)
            ready = torch.cuda.Event() if stream is not None else None
            if ready is not None:
                ready.record()
        if on_device >= 0 and len(todo) == len(found) == len(errors) and all(error is None for error in errors):
            # all decoded here, nothing to recycle
            return [Fetched(fetched.meta, None, False, ready) for fetched in found]
        decoded = list(found)
        for i, source, error in zip(todo, sources, errors, strict=True):
            fetched = found[i]
            if error is not None:  # the caller decodes it again and reports it, after ``ready``
                decoded[i] = fetched._replace(payload=source, ready=ready)
                continue
            if fetched.owned and on_device < 0 and fetched.payload is not None:
                self._recycle(fetched.payload)
            decoded[i] = Fetched(fetched.meta, None, False, ready)
        return decoded

    def _recycle(self, payload: torch.Tensor) -> None:
        """Return a host payload to the buffer pool once no tier can still be reading it."""
        if self._remote is None and not payload.is_cuda:
            host_pool.release(payload)

    def _chunk_views(self, kv: KV, first: int, count: int) -> Sequence[KV]:
        """Views (or pages) of chunks ``first .. first + count - 1`` of ``kv`` along the token axis."""
        chunk = self.config.chunk_size
        if isinstance(kv, KVPages):
            return [token_slice(kv, k * chunk, (k + 1) * chunk) for k in range(first, first + count)]
        # the same views as token_slice's, as rows of one view, made when asked for (Python per chunk adds up on a GPU)
        return Rows(kv[:, :, first * chunk : (first + count) * chunk].unflatten(2, (count, chunk)).movedim(2, 0))

    def _decode_prefix(self, fetched: list[Fetched], spec: KVSpec, out: KV, first: int) -> int:
        """Decode fetched chunks into chunks ``first, first + 1, ...`` of ``out`` with one codec call; how many, from
        the first, are now in place (those an I/O thread decoded too).

        Payloads this call owns go back to the buffer pool once decoding no longer needs them.
        """
        usable = 0
        while usable < len(fetched) and self._matches(fetched[usable].meta, spec):
            usable += 1
        device = out.device
        for ready in _distinct_events(item.ready for item in fetched[:usable]):  # written (or tried) by an I/O thread
            torch.cuda.current_stream(device).wait_event(ready)
        todo = [k for k in range(usable) if fetched[k].payload is not None]
        payloads = [fetched[k].payload for k in todo]
        for payload in payloads:  # GPU payloads may come from an I/O thread's stream: keep them until this one is done
            if payload.is_cuda:
                payload.record_stream(torch.cuda.current_stream(payload.device))
        if not self._codec.decodes_from_host:
            payloads = [p.to(device, non_blocking=True) for p in payloads]
        errors = []
        if todo:  # the views only where a chunk is left to decode here
            outs = self._chunk_views(out, first, len(fetched))
            errors = self._codec.decode_many(payloads, spec, self.config.chunk_size, [outs[k] for k in todo])
        failed = next(((k, error) for k, error in zip(todo, errors, strict=True) if error is not None), None)
        done = usable
        if failed is not None:  # the prefix ends before the first chunk that did not decode
            done, error = failed
            log.warning("chunk %s failed to decode (%s); treating as a miss", fetched[done].meta.key.hex(), error)
            self.metrics.inc("decode_errors")
        self.metrics.inc("bytes_read", sum(item.meta.payload_len for item in fetched[:done]))
        if device.type != "cuda":  # a copy to the GPU may still be reading a host buffer
            for item in fetched:
                if item.owned and item.payload is not None:
                    self._recycle(item.payload)
        return done

    def _same_settings(self, meta: ChunkMeta, spec: KVSpec) -> bool:
        return ((meta.spec is spec or meta.spec == spec) and meta.codec == self._codec.name
                and meta.codec_params == self._codec_params and meta.num_tokens == self.config.chunk_size)

    def _matches(self, meta: ChunkMeta, spec: KVSpec) -> bool:
        """True when a chunk was written with this cache's settings (its namespace promises so)."""
        if not self._same_settings(meta, spec):
            log.warning("chunk %s was written with other settings; treating as a miss", meta.key.hex())
            self.metrics.inc("mismatched_chunks")
            return False
        return True


class _Started:
    """A fetch task begun on this thread (``start(*args)`` returns the function that ends it), standing in for a pool's
    future: :meth:`result` ends it, once, on this thread, and gives what it fetched or raises what it raised (also
    what beginning it raised). It cannot be cancelled: its reads are under way."""

    def __init__(self, start: Callable[..., Callable[[], list[Fetched]]], *args: Any) -> None:
        self._end: Callable[[], list[Fetched]] | None = None
        self._outcome: list[Fetched] | None = None
        self._error: Exception | None = None
        try:
            self._end = start(*args)
        except Exception as exc:  # noqa: BLE001 - raised where the result is taken, as from a pool's future
            self._error = exc

    def result(self) -> list[Fetched]:
        if self._end is not None:
            end, self._end = self._end, None
            try:
                self._outcome = end()
            except Exception as exc:  # noqa: BLE001 - kept for a second call, as a future keeps it
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._outcome

    def cancel(self) -> bool:
        return False


def _buffers(payloads: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors that ``payloads`` are views of, each once (a batched read's payloads share one): a stream recorded
    on a view is recorded on its whole allocation."""
    return list({id(base): base for base in (p if p._base is None else p._base for p in payloads)}.values())


def _with_payloads(found: list[Fetched], payloads: Rows) -> list[Fetched]:
    """``found`` with each chunk's payload set to its row of ``payloads`` where it is None."""
    return [fetched if fetched.payload is not None else fetched._replace(payload=row)
            for fetched, row in zip(found, payloads, strict=True)]


def _device_of(targets: Sequence[KV]) -> torch.device:
    """The device of ``targets`` (views or pages of one ``out``), without making a view of :class:`Rows`."""
    return targets.stack.device if isinstance(targets, Rows) else targets[0].device


def _distinct_events(events: Iterable[torch.cuda.Event | None]) -> list[torch.cuda.Event]:
    """Each event once (the chunks of one fetch task share theirs), Nones left out."""
    return list({id(event): event for event in events if event is not None}.values())


def store_batches(n: int, group: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``n`` chunks split into batches of at most ``group`` chunks, and into
    ``min(n, STORE_BATCHES)`` batches at least, as even as they come."""
    count = max(-(-n // group), min(n, STORE_BATCHES))
    if not count:
        return []
    bounds = [n * k // count for k in range(count + 1)]
    return list(itertools.pairwise(bounds))


def _check_writable(path: str) -> None:
    """Create ``path`` if needed and prove it is a writable directory, or raise a ValueError naming it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gdscache-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"path {path!r} is not a writable directory: {exc.strerror or exc}") from None


def _codec_kwargs(cfg: Config) -> dict[str, Any]:
    params = dict(cfg.codec_params)
    if cfg.codec_profile is not None:
        if cfg.codec != "cachegen":
            raise ValueError(f"codec_profile applies to the cachegen codec only, not {cfg.codec!r}")
        params["profile"] = cfg.codec_profile
    return params


def _make_remote(cfg: Config):  # the remote tier imports fsspec lazily: no annotation names its class
    if cfg.remote_url is None:
        return None
    from gdscache.tiers.remote import RemoteTier

    return RemoteTier(cfg.remote_url, cfg.remote_options, timeout_s=cfg.remote_timeout_s,
                      concurrency=cfg.remote_concurrency, write_mode=cfg.remote_write)
