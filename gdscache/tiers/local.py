"""The local tier: one chunk file per key in a directory, LRU eviction under a byte quota.

Several processes may share one directory. Files are published atomically by the backend, so a
reader sees a whole chunk or none; each process keeps its own index and discovers the others'
files on demand. A file that fails validation is moved to ``.quarantine/`` and reads as a miss.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from gdscache.format.checksum import PipelinedDigest, digests
from gdscache.format.chunkfile import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    PAYLOAD_OFFSET,
    ChunkMeta,
    CorruptChunk,
    check_digest,
    pack_header,
    unpack_header,
    unpack_headers,
)
from io_backends.base import ALIGN, FileBackend, FilesInFlight, FilesRead, Part, ReadHandle, Rows, align_up
from io_backends.buffers import host_pool

log = logging.getLogger(__name__)
SUFFIX = ".gdc"
NAMESPACE_FILE = "namespace.json"
QUARANTINE = ".quarantine"
STALE_TEMP_S = 600.0
ENOSPC_BACKOFF_S = 5.0
PIECE_BYTES = 32 << 20
"""Host payloads are read in pieces of this size, each one verified while the next is read. A 32 MiB
(Llama-8B) chunk stays one request: 8 MiB pieces made cold O_DIRECT reads slower on a 16-core machine
(benchmarks/results/bench.md), as they keep less I/O in flight per thread."""
_HOST = socket.gethostname().replace(".", "_")
T = TypeVar("T")


@dataclass
class LocalStats:
    writes: int = 0
    write_errors: int = 0
    enospc: int = 0
    reads: int = 0
    read_misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    temps_removed: int = 0


@dataclass
class _Pending:
    """A chunk on its way to disk: where it goes in the caller's list, its file, and its bytes."""

    index: int
    key: bytes
    path: str
    size: int
    parts: list[Part]
    reserved: bool = True
    """Its bytes count in the tier's total while neither published nor failed."""


class ChunksRead(NamedTuple):
    """What :meth:`LocalTier.start_read_many` read: per chunk ``(meta, payload)`` or None (a miss), and ``payloads``
    and ``metas``: every payload as :class:`~io_backends.base.Rows` of one view, and every meta, where every chunk is
    a hit of one length (a batch's next steps then take them whole, and no view per payload is made unless one of
    ``hits`` is asked for), else None."""

    hits: Sequence[tuple[ChunkMeta, torch.Tensor] | None]
    payloads: Rows | None

    @property
    def metas(self) -> list[ChunkMeta] | None:
        return self.hits.metas if isinstance(self.hits, _RowHits) else None


class _RowHits(Sequence[tuple[ChunkMeta, torch.Tensor]]):
    """:attr:`ChunksRead.hits` where every chunk is a hit whose payload is a row of one view: each ``(meta, payload)``
    made when asked for."""

    def __init__(self, metas: list[ChunkMeta], rows: Rows) -> None:
        self.metas, self._rows = metas, rows

    def __len__(self) -> int:
        return len(self.metas)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(zip(self.metas[index], self._rows[index], strict=True))
        return self.metas[index], self._rows[index]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalTier:
    """Chunk files under ``root/<namespace>/<kk>/<key>.gdc`` with an in-memory LRU index."""

    def __init__(self, root: str, backend: FileBackend, *, max_bytes: int | None = None, durable: bool = True) -> None:
        self.root = root
        self.backend = backend
        self.max_bytes = max_bytes
        self.durable = durable
        self.stats = LocalStats()
        self._index: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # key -> (path, bytes on disk), LRU first
        self._bytes = 0
        self._in_use: dict[bytes, int] = {}  # readers of each key being read
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self._no_evict_until = 0.0
        self._scan()

    # ----------------------------------------------------------------- index and layout
    def path_of(self, namespace: bytes, key: bytes) -> str:
        khex = key.hex()
        return os.path.join(self.root, namespace.hex(), khex[:2], khex + SUFFIX)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def _scan(self) -> None:
        """Index every chunk file under root (LRU order by mtime); clear dead temps and stray files."""
        found: list[tuple[float, bytes, str, int]] = []
        now = time.time()
        for _, entry in iter_entries(self.root):
            name = entry.name
            key_hex = chunk_key_hex(name)
            if key_hex is None and not name.endswith(".tmp"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if key_hex is None:
                self._maybe_remove_temp(entry.path, name, st.st_mtime, now)
            elif st.st_size < HEADER_SIZE:
                self.quarantine(entry.path, "shorter than a header")
            else:
                found.append((st.st_mtime, bytes.fromhex(key_hex), entry.path, st.st_size))
        found.sort()
        for _, key, path, size in found:
            self._index[key] = (path, size)
            self._bytes += size
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            self._evict(self._bytes - self.max_bytes)

    def _maybe_remove_temp(self, path: str, name: str, mtime: float, now: float) -> None:
        parts = name.split(".")  # ['', keyname, 'gdc', host, pid, rand, 'tmp']
        dead = len(parts) >= 5 and parts[-4] == _HOST and parts[-3].isdigit() and not _pid_alive(int(parts[-3]))
        if dead or now - mtime > STALE_TEMP_S:
            try:
                os.unlink(path)
                self.stats.temps_removed += 1
            except FileNotFoundError:
                pass

    def contains(self, namespace: bytes, key: bytes) -> bool:
        """True if the chunk is indexed or another process has published it."""
        return self.contains_many(namespace, [key])[0]

    def contains_many(self, namespace: bytes, keys: Sequence[bytes], *, leading: bool = False) -> list[bool]:
        """:meth:`contains` for each of ``keys`` (one look at the index, then a ``stat`` for each key not in it); with
        ``leading``, only for those up to the first the tier does not hold (then the last answer is False, or every
        key is held)."""
        with self._lock:
            found = [key in self._index for key in keys]
        for i, key in enumerate(keys):
            if not found[i]:
                path = self.path_of(namespace, key)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    if leading:
                        return found[: i + 1]
                    continue
                self._add(key, path, size)
                found[i] = True
        return found

    def _add(self, key: bytes, path: str, size: int) -> None:
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return
            self._index[key] = (path, size)
            self._bytes += size

    def _forget(self, key: bytes) -> None:
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    # ----------------------------------------------------------------- write
    def ensure_namespace(self, namespace: bytes, info: dict) -> None:
        """Create the namespace directory and its human-readable ``namespace.json`` once."""
        ns_dir = os.path.join(self.root, namespace.hex())
        target = os.path.join(ns_dir, NAMESPACE_FILE)
        if os.path.exists(target):
            return
        os.makedirs(ns_dir, exist_ok=True)
        data = json.dumps(info, indent=2, sort_keys=True).encode()
        try:
            _write_small(target, data)
        except OSError as exc:
            log.warning("could not write %s: %s", target, exc)

    def write(self, namespace: bytes, meta: ChunkMeta, payload: torch.Tensor | list[torch.Tensor]) -> bool:
        """Publish one chunk (its payload as one buffer or as consecutive runs); False when the disk refuses it."""
        return self.write_many(namespace, [(meta, payload)])[0]

    def write_many(self, namespace: bytes,
                   chunks: Sequence[tuple[ChunkMeta, torch.Tensor | list[torch.Tensor]]]) -> list[bool]:
        """Publish several chunks, their writes in flight and fsynced together where the backend can; per chunk,
        False when the disk refuses it."""
        writing = self.start_many(namespace, [(meta.key, payload) for meta, payload in chunks])
        return writing.finish([meta for meta, _ in chunks])

    def start_many(self, namespace: bytes, chunks: Sequence[tuple[bytes, torch.Tensor | list[torch.Tensor]]]
                   ) -> ChunksInFlight:
        """Start writing several chunks, given as ``(key, payload)``, before their headers are known: where the
        backend can (:meth:`~io_backends.base.FileBackend.start_files`), the payloads go to disk while the caller
        checksums them. :meth:`ChunksInFlight.finish` takes their metadata and publishes them."""
        todo: list[_Pending] = []
        for i, (key, payload) in enumerate(chunks):
            runs = payload if isinstance(payload, list) else [payload]
            size = align_up(PAYLOAD_OFFSET + sum(run.numel() for run in runs))
            if self.max_bytes is not None and size > self.max_bytes:
                log.warning("chunk of %d bytes exceeds the %d-byte disk quota; not stored", size, self.max_bytes)
                continue
            path = self.path_of(namespace, key)
            directory = os.path.dirname(path)
            if directory not in self._known_dirs:
                os.makedirs(directory, exist_ok=True)
                self._known_dirs.add(directory)
            parts, offset = [], PAYLOAD_OFFSET
            for run in runs:
                parts.append(Part(offset, run))
                offset += run.numel()
            todo.append(_Pending(i, key, path, size, parts))
        with self._lock:  # reserve the bytes first, so parallel writers cannot overshoot the quota together
            self._bytes += sum(item.size for item in todo)
            excess = self._bytes - self.max_bytes if self.max_bytes is not None else 0
        self._pin([item.key for item in todo])  # eviction (for the quota, or room for a retry) must not take them
        try:
            if excess > 0:
                self._evict(excess)
            files = self.backend.start_files([(item.path, item.parts) for item in todo], durable=self.durable)
        except BaseException:
            self._settle(todo)
            raise
        return ChunksInFlight(self, todo, files, len(chunks))

    def _settle(self, todo: list[_Pending]) -> None:
        """The end of a group of writes: unpin, give back what is still reserved (an unexpected error), keep the
        quota."""
        self._unpin([item.key for item in todo])
        for item in todo:
            if item.reserved:  # neither published nor failed
                self._unreserve(item)
        if self.max_bytes is not None:  # groups written side by side may have outgrown the quota together; LRU
            self.evict_to(self.max_bytes)  # order takes older chunks first, this group's only if it alone is larger

    def _write_pending(self, todo: list[_Pending], stored: list[bool], errors: list[OSError | None]) -> None:
        """Account for ``todo`` (bytes reserved), written with ``errors``; on ENOSPC evict to make room and write
        those again, once."""
        for attempt in (1, 2):
            if attempt == 2:
                errors = self.backend.write_files([(item.path, item.parts) for item in todo], durable=self.durable)
            full: list[_Pending] = []
            for item, error in zip(todo, errors, strict=True):
                if error is None:
                    self._published(item)
                    stored[item.index] = True
                elif error.errno == errno.ENOSPC:
                    self.stats.enospc += 1
                    full.append(item)
                else:
                    log.warning("could not write chunk %s: %s", item.path, error)
                    self._unreserve(item)
            if not full:
                return
            if attempt == 1 and self._make_room_after_enospc(sum(item.size for item in full)):
                todo = full
                continue
            if attempt == 2:  # eviction did not help: the disk is full of other data
                self._no_evict_until = time.monotonic() + ENOSPC_BACKOFF_S
            log.warning("disk full under %s; %d chunk(s) not stored (stored chunks and reads are unaffected)",
                        self.root, len(full))
            for item in full:
                self._unreserve(item)
            return

    def _published(self, item: _Pending) -> None:
        self.stats.writes += 1
        item.reserved = False
        with self._lock:
            if item.key in self._index:  # a duplicate store replaced the same bytes
                self._bytes -= item.size
                self._index.move_to_end(item.key)
            else:
                self._index[item.key] = (item.path, item.size)

    def _unreserve(self, item: _Pending) -> None:
        self.stats.write_errors += 1
        item.reserved = False
        with self._lock:
            self._bytes -= item.size

    def _make_room_after_enospc(self, size: int) -> bool:
        """Evict twice ``size`` (the bytes that did not fit) for a retry, unless a recent retry showed that eviction
        does not help.

        A disk filled by someone else must not drain the cache: after an eviction that did not make
        room, eviction on ENOSPC pauses for ``ENOSPC_BACKOFF_S`` seconds.
        """
        return time.monotonic() >= self._no_evict_until and self._evict(2 * size) > 0

    def _evict(self, nbytes: int) -> int:
        """Remove least-recently-used chunks not in use until ``nbytes`` are freed; returns bytes freed."""
        freed = 0
        victims: list[tuple[bytes, str, int]] = []
        with self._lock:
            for key, (path, size) in self._index.items():
                if freed >= nbytes:
                    break
                if key in self._in_use:
                    continue
                victims.append((key, path, size))
                freed += size
            for key, _, size in victims:
                del self._index[key]
                self._bytes -= size
        for _, path, _ in victims:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # forgotten all the same: a later scan finds it again if it is still there
                log.warning("could not remove evicted chunk %s: %s", path, exc)
            self.backend.forget(path)
            self.stats.evictions += 1
        return freed

    def evict_to(self, max_bytes: int) -> int:
        """Evict down to ``max_bytes``; returns bytes freed."""
        with self._lock:
            excess = self._bytes - max_bytes
        return self._evict(excess) if excess > 0 else 0

    # ----------------------------------------------------------------- read
    def read(self, namespace: bytes, key: bytes, device: torch.device) -> tuple[ChunkMeta, torch.Tensor] | None:
        """Read and verify one chunk into a new buffer: on a CUDA ``device`` when the backend reads into GPU
        memory, else in host memory; None on a miss or a bad file.

        A host payload comes from ``io_backends.buffers.host_pool``: the caller may release it there.
        """
        if device.type == "cuda" and self.backend.gpu_native:
            return self.read_many(namespace, [key], device)[0]
        return self._guarded(namespace, key, lambda handle: self._read_payload(handle, self._header(handle, key)))

    def read_runs(self, namespace: bytes, key: bytes, runs: list[torch.Tensor]) -> ChunkMeta | None:
        """Read one chunk's payload straight into ``runs`` (consecutive pieces of it) and verify it there.

        On None, ``runs`` hold unspecified bytes.
        """
        total = sum(r.numel() for r in runs)

        def scatter(handle: ReadHandle) -> ChunkMeta:
            pieces = split_pieces(runs, PIECE_BYTES)
            if handle.size < PAYLOAD_OFFSET + total or not pieces:  # too short for what we expect: let the header say why
                meta, done = self._header(handle, key), 0
            else:  # header and first piece in one request
                header = host_pool.acquire(HEADER_SIZE)
                try:
                    handle.read_into_runs([header, *pieces[0]], 0)
                    meta = unpack_header(header.numpy().tobytes(), handle.size)
                finally:
                    host_pool.release(header)
                if meta.key != key:
                    raise CorruptChunk("file holds another key")
                done = 1
            if meta.payload_len != total:
                raise CorruptChunk(f"payload is {meta.payload_len} bytes, the destination {total}")
            _read_verified(handle, meta, pieces, done)
            return meta

        return self._guarded(namespace, key, scatter)

    def _read_payload(self, handle: ReadHandle, meta: ChunkMeta) -> tuple[ChunkMeta, torch.Tensor]:
        payload = host_pool.acquire(meta.payload_len)
        try:
            _read_verified(handle, meta, split_pieces([payload], PIECE_BYTES), 0)
        except BaseException:
            host_pool.release(payload)
            raise
        return meta, payload

    def read_many(self, namespace: bytes, keys: Sequence[bytes],
                  device: torch.device) -> list[tuple[ChunkMeta, torch.Tensor] | None]:
        """:meth:`read` of several chunks into one new buffer on ``device``: every file's header and payload reads
        in flight at once (:meth:`FileBackend.read_files`), payloads on a GPU verified with one host sync. Each chunk
        is a hit or a miss on its own. Host payloads here are not from ``host_pool``: never release them there.

        A CUDA ``device`` needs a backend that reads into GPU memory (``gpu_native``).
        """
        return list(self.start_read_many(namespace, keys, device)().hits)

    def start_read_many(self, namespace: bytes, keys: Sequence[bytes],
                        device: torch.device) -> Callable[[], ChunksRead]:
        """Begin :meth:`read_many`; the returned function waits for the reads, verifies the chunks and gives them. It
        must be called, once, on this thread (the keys stay pinned until then)."""
        paths, sizes = self._files_of(namespace, keys)
        self._pin(keys)
        # on a GPU, this thread's own stream: the buffer and its checksums neither wait for nor hold up other
        # threads' GPU work (the caller must record_stream a payload where it uses it)
        stream = thread_stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                reading = self.backend.start_read_files(paths, HEADER_SIZE, device, max_body=MAX_PAYLOAD, touch=True,
                                                        sizes=sizes)
        except torch.cuda.OutOfMemoryError as exc:  # no room for the payloads now: misses, not a crash
            self._unpin(keys)
            error = OSError(errno.ENOMEM, f"no memory for the chunks' payloads: {exc}")
            return lambda: ChunksRead(self._account(keys, paths, [error] * len(keys)), None)
        except BaseException:
            self._unpin(keys)
            raise

        def finish() -> ChunksRead:
            try:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    outcome, payloads = self._verified(keys, reading())
            finally:
                self._unpin(keys)
            if isinstance(outcome, _RowHits):  # every chunk a hit
                self._hits(keys)
                return ChunksRead(outcome, payloads)
            return ChunksRead(self._account(keys, paths, outcome), None)

        return finish

    def _account(self, keys: Sequence[bytes], paths: Sequence[str],
                 outcome: Sequence[object]) -> list[tuple[ChunkMeta, torch.Tensor] | None]:
        """The hits of a :meth:`read_many` (``outcome`` per chunk: ``(meta, payload)`` or an exception), misses
        accounted (:meth:`_missed`) and hits too."""
        results: list[tuple[ChunkMeta, torch.Tensor] | None] = []
        for key, path, got in zip(keys, paths, outcome, strict=True):
            if isinstance(got, Exception):
                self._missed(path, key, got)
                results.append(None)
            else:
                results.append(got)
        self._hits([key for key, got in zip(keys, results, strict=True) if got is not None])
        return results

    def _files_of(self, namespace: bytes, keys: Sequence[bytes]) -> tuple[list[str], list[int] | None]:
        """Each key's file (as indexed, one look under the lock, else :meth:`path_of`), and the files' sizes as
        indexed (None where a key is not indexed)."""
        with self._lock:
            known = [self._index.get(key) for key in keys]
        paths = [entry[0] if entry is not None else self.path_of(namespace, key) for key, entry in zip(keys, known)]
        return paths, None if None in known else [entry[1] for entry in known]

    @staticmethod
    def _verified(keys: Sequence[bytes], read: FilesRead
                  ) -> tuple[Sequence[tuple[ChunkMeta, torch.Tensor] | Exception], Rows | None]:
        """Per chunk of :meth:`read_many`: ``(meta, payload)`` once its header and checksum hold, or the exception
        that makes it a miss (a :class:`CorruptChunk` quarantines its file); and the payloads as :class:`Rows` where
        every chunk holds and all are of one length (:attr:`ChunksRead.payloads`; then the first is a
        :class:`_RowHits`)."""
        metas = unpack_headers(keys, read.heads, read.sizes)
        rows = _payload_rows(metas, read)
        if rows is not None:  # every chunk read whole, of one length: checked together
            sums = digests(rows, [meta.checksum_alg for meta in metas])
            if b"".join(sums) == b"".join(meta.payload_digest for meta in metas):
                return _RowHits(metas, rows), rows  # ``_payload_rows`` found every one a ChunkMeta
        outcome: list[tuple[ChunkMeta, torch.Tensor] | Exception] = list(read.errors)
        checked: list[tuple[int, ChunkMeta, torch.Tensor]] = []
        for i, (meta, size) in enumerate(zip(metas, read.sizes, strict=True)):
            if size - PAYLOAD_OFFSET >= MAX_PAYLOAD:  # no chunk is that large: a stray file, never read
                outcome[i] = CorruptChunk(f"file of {size - PAYLOAD_OFFSET} payload bytes")
            if outcome[i] is not None:
                continue
            if isinstance(meta, CorruptChunk):
                outcome[i] = meta
                continue
            body = read.bodies[i]
            if not 0 <= body.numel() - meta.payload_len < ALIGN:  # a payload, maybe padded to a 4 KiB boundary
                outcome[i] = CorruptChunk(f"file of {size} bytes holds no {meta.payload_len}-byte payload")
                continue
            checked.append((i, meta, body if meta.payload_len == body.numel() else body[: meta.payload_len]))
        sums = digests([p for _, _, p in checked], [m.checksum_alg for _, m, _ in checked])
        for (i, meta, payload), got in zip(checked, sums, strict=True):
            try:
                check_digest(meta, got)
                outcome[i] = (meta, payload)
            except CorruptChunk as exc:
                outcome[i] = exc
        return outcome, None

    @staticmethod
    def _header(handle: ReadHandle, key: bytes) -> ChunkMeta:
        """Read and validate the header of an open chunk file that should hold ``key``."""
        meta = unpack_header(handle.read_bytes(0, HEADER_SIZE), handle.size)
        if meta.key != key:
            raise CorruptChunk("file holds another key")
        return meta

    def _guarded(self, namespace: bytes, key: bytes, body: Callable[[ReadHandle], T]) -> T | None:
        """Open the chunk and run ``body`` on it, the key pinned meanwhile; faults become None."""
        path = self.path_of(namespace, key)
        self._pin([key])
        try:
            with self.backend.open_read(path) as handle:
                result = body(handle)
        except (OSError, CorruptChunk) as exc:
            self._missed(path, key, exc)
            return None
        finally:
            self._unpin([key])
        self._hit(path, key)
        return result

    def _pin(self, keys: Sequence[bytes]) -> None:
        """Keep ``keys`` from eviction while they are read."""
        with self._lock:
            in_use = self._in_use
            for key in keys:
                in_use[key] = in_use.get(key, 0) + 1

    def _unpin(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            in_use = self._in_use
            for key in keys:
                left = in_use.pop(key) - 1
                if left:
                    in_use[key] = left

    def _missed(self, path: str, key: bytes, exc: Exception) -> None:
        """Account a read that failed: a vanished file is forgotten, a corrupt one quarantined, an I/O fault logged."""
        if isinstance(exc, CorruptChunk):
            self.quarantine(path, str(exc))
            self._forget(key)
            return
        if isinstance(exc, FileNotFoundError):
            self._forget(key)
        else:
            if isinstance(exc, OSError) and exc.errno == errno.ESTALE:  # larger than indexed: its size is looked up anew
                self._forget(key)
            log.warning("read of %s failed: %s; treating as a miss", path, exc)
        self.stats.read_misses += 1

    def _hit(self, path: str, key: bytes) -> None:
        """Account a verified read: most recently used here, and by mtime for the next process's scan."""
        self._hits([key])
        try:
            os.utime(path)
        except OSError:
            pass

    def _hits(self, keys: Sequence[bytes]) -> None:
        """Account verified reads whose files were touched as they were read: most recently used here."""
        with self._lock:
            self.stats.reads += len(keys)
            for key in keys:
                if key in self._index:
                    self._index.move_to_end(key)

    def quarantine(self, path: str, why: str) -> None:
        """Move a bad chunk file aside (or delete it if that fails) and log why."""
        self.stats.corrupt += 1
        log.warning("corrupt chunk %s (%s): quarantined; it reads as a miss", path, why)
        qdir = os.path.join(self.root, QUARANTINE)
        try:
            os.makedirs(qdir, exist_ok=True)
            os.rename(path, os.path.join(qdir, f"{os.path.basename(path)}.{int(time.time() * 1e6)}"))
        except FileNotFoundError:
            pass
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.backend.forget(path)


class ChunksInFlight:
    """Chunks of :meth:`LocalTier.start_many` on their way to disk: :meth:`finish` (or :meth:`abandon`) must
    follow, once."""

    def __init__(self, tier: LocalTier, todo: list[_Pending], files: FilesInFlight, count: int) -> None:
        self._tier, self._todo, self._files, self._count = tier, todo, files, count
        self._ended = False

    def finish(self, metas: Sequence[ChunkMeta]) -> list[bool]:
        """Publish the chunks with their headers (``metas``, one per chunk given to ``start_many``, in order); per
        chunk, False when the disk refused it."""
        self._end()
        stored = [False] * self._count
        try:
            if len(metas) != self._count:
                raise ValueError(f"{len(metas)} headers for {self._count} chunks")
            headers = []
            for item in self._todo:
                meta = metas[item.index]
                if meta.key != item.key or align_up(meta.file_size) != item.size:
                    raise ValueError(f"header {item.index} is not its chunk's (key or length differs)")
                headers.append(Part(0, pack_header(meta)))
        except BaseException:
            self._drop()
            raise
        try:
            try:
                errors = self._files.finish([[header] for header in headers])
            except OSError as exc:  # the library could not go on: none was published
                errors = [exc] * len(self._todo)
            for item, header in zip(self._todo, headers, strict=True):
                item.parts.insert(0, header)  # a retry writes the whole file
            self._tier._write_pending(self._todo, stored, errors)
        finally:
            self._tier._settle(self._todo)
        return stored

    def abandon(self) -> None:
        """Store none of them (what was written is removed)."""
        self._end()
        self._drop()

    def _drop(self) -> None:
        try:
            self._files.abandon()
        finally:
            self._tier._settle(self._todo)

    def __del__(self) -> None:
        if not getattr(self, "_ended", True):  # dropped unfinished (say, an interrupt): give back what it holds
            log.warning("%d chunk write(s) were dropped unfinished; not stored", len(self._todo))
            self.abandon()

    def _end(self) -> None:
        if self._ended:
            raise RuntimeError("these chunks were already finished or abandoned")
        self._ended = True


def split_pieces(runs: Sequence[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """Consecutive 1-D ``runs`` regrouped into pieces of ``size`` bytes (the last may be shorter), cutting runs where needed."""
    pieces: list[list[torch.Tensor]] = [[]]
    room = size
    for run in runs:
        start, n = 0, run.numel()
        while start < n:
            take = min(room, n - start)
            pieces[-1].append(run if take == n else run[start : start + take])
            start += take
            room -= take
            if not room:
                pieces.append([])
                room = size
    return [p for p in pieces if p]


_threads = threading.local()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of this thread's own on ``device`` (created once per thread and device)."""
    streams = _threads.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _payload_rows(metas: Sequence[ChunkMeta | CorruptChunk], read: FilesRead) -> Rows | None:
    """Every chunk's payload as rows of ``read``'s bodies, where each file was read whole into one row of one
    stack, each header holds and all promise one payload length that fills its row (up to the 4 KiB padding); else
    None."""
    if not isinstance(read.bodies, Rows) or read.errors.count(None) != len(metas) or \
            not all(isinstance(meta, ChunkMeta) for meta in metas):
        return None
    lengths = {meta.payload_len for meta in metas}
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    return Rows(read.bodies.stack[:, :length]) if 0 <= read.bodies.stack.shape[1] - length < ALIGN else None


def _read_verified(handle: ReadHandle, meta: ChunkMeta, pieces: list[list[torch.Tensor]], done: int) -> None:
    """Read the payload's ``pieces`` after the first ``done`` (already in) and verify the whole payload.

    Each piece is hashed on a helper thread while the next one is read; raises :class:`CorruptChunk`.
    """
    digest = PipelinedDigest(meta.checksum_alg)
    offset = PAYLOAD_OFFSET
    try:
        for i, piece in enumerate(pieces):
            if i >= done:
                handle.read_into_runs(piece, offset)
            digest.feed(piece, overlap=i + 1 < len(pieces))
            offset += sum(run.numel() for run in piece)
        got = digest.digest()
    finally:
        digest.wait()  # no hashing of a destination the caller is about to reuse
    check_digest(meta, got)


def scandir_sorted(path: str) -> list[os.DirEntry[str]]:
    """Entries of ``path`` in name order; none when it is missing or not a directory."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def namespace_dirs(root: str) -> list[os.DirEntry[str]]:
    """The ``<namespace-hex32>`` directories under a local-tier root."""
    return [e for e in scandir_sorted(root) if e.is_dir() and is_hex(e.name, 32)]


def iter_entries(root: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(namespace hex, entry)`` for every file in the chunk directories under ``root``, temporaries included."""
    for ns in namespace_dirs(root):
        for kk in scandir_sorted(ns.path):
            if kk.is_dir():
                for entry in scandir_sorted(kk.path):
                    yield ns.name, entry


def chunk_key_hex(name: str) -> str | None:
    """The key of a published chunk file name ``<key-hex32>.gdc``, else None."""
    stem = name[: -len(SUFFIX)]
    return stem if name.endswith(SUFFIX) and is_hex(stem, 32) else None


def _write_small(path: str, data: bytes) -> None:
    """Atomically write a small metadata file with plain buffered I/O."""
    tmp = f"{path}.{_HOST}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
