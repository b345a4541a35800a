"""The two small interfaces every byte mover implements.

``FileBackend`` moves bytes between buffers (host or GPU ``torch.uint8`` tensors) and files on a
local or parallel filesystem; ``ObjectStore`` does the same for an object store. Nothing here knows
what the bytes mean: gdscache builds its chunk format on top.

A *buffer* is a 1-D, contiguous ``torch.uint8`` tensor on the CPU or on a CUDA device.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import contextlib
import errno
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Self, TypeVar, overload

import numpy as np
import torch

ALIGN = 4096
"""Offsets and lengths that O_DIRECT and GPUDirect Storage need aligned are multiples of this."""

T = TypeVar("T")


def align_up(n: int, align: int = ALIGN) -> int:
    """Smallest multiple of ``align`` that is >= ``n``."""
    return (n + align - 1) // align * align


def check_buffer(buf: torch.Tensor, name: str = "buffer") -> None:
    """Raise a clear error unless ``buf`` is a 1-D contiguous uint8 tensor."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise TypeError(
            f"{name} must be a 1-D contiguous torch.uint8 tensor, got dtype={buf.dtype} "
            f"shape={tuple(buf.shape)} contiguous={buf.is_contiguous()}"
        )


class Rows(Sequence[torch.Tensor]):
    """The rows of one tensor (``stack[0]``, ``stack[1]``, ...) as a sequence, each view made only when asked for.

    Per-view Python is what a batch of small buffers pays for: a batch read's bodies, or a request's chunks, handed
    on as ``Rows`` let the next step take the whole ``stack`` at once. A slice with step 1 is ``Rows`` again."""

    __slots__ = ("_views", "stack")

    def __init__(self, stack: torch.Tensor) -> None:
        if stack.dim() < 1:
            raise ValueError("Rows needs a tensor of at least one dimension")
        self.stack = stack
        self._views: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return self.stack.shape[0]

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[torch.Tensor]: ...
    def __getitem__(self, index: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return Rows(self.stack[start:max(start, stop)])
            return [self[i] for i in range(start, stop, step)]
        return self._all()[index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._all())

    def _all(self) -> tuple[torch.Tensor, ...]:
        if self._views is None:
            self._views = self.stack.unbind()  # one call for every view, once one is asked for
        return self._views


def _nothing_pending() -> None:
    return None


class ForkSafeLock:
    """A ``threading.Lock`` (as a context manager) that a forked child gets back free: one that another thread of
    the parent held at the fork would otherwise stay held in the child forever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (lock := me()) is not None and lock._renew())

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class SharedPool:
    """A process-wide thread pool, started on first use. A forked child starts its own: the copy it inherits has
    no threads, and work submitted to it would wait forever."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = ForkSafeLock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool = None

    def get(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._name)
            return self._pool


_fsync_pool = SharedPool(16, "gdscache-fsync")


def fsync_all(fds: Sequence[int]) -> list[OSError | None]:
    """``fsync`` several open files at once (on a shared pool of 16 threads), so that a journaling filesystem can
    commit them together rather than one commit each; per file None or the ``OSError`` its fsync raised."""

    def one(fd: int) -> OSError | None:
        try:
            os.fsync(fd)
        except OSError as exc:
            return exc
        return None

    if len(fds) < 2:
        return [one(fd) for fd in fds]
    return list(_fsync_pool.get().map(one, fds))


@dataclass(frozen=True)
class Part:
    """One piece of a file to write: ``data`` (bytes or a buffer) placed at byte ``offset``."""

    offset: int
    data: bytes | torch.Tensor

    @property
    def nbytes(self) -> int:
        return len(self.data) if isinstance(self.data, (bytes, bytearray)) else self.data.numel()


class ReadHandle(abc.ABC):
    """An open file to read from; use as a context manager."""

    size: int

    @abc.abstractmethod
    def read_bytes(self, offset: int, nbytes: int) -> bytes:
        """Read ``nbytes`` at ``offset`` into host memory. Raises ``OSError`` on a short read."""

    @abc.abstractmethod
    def read_into(self, dest: torch.Tensor, offset: int) -> None:
        """Fill all of ``dest`` (host or GPU buffer) from ``offset``. Raises ``OSError`` on a short read."""

    def read_into_runs(self, dests: Sequence[torch.Tensor], offset: int) -> None:
        """Fill ``dests`` in order from consecutive file bytes starting at ``offset`` (a scatter read).

        Lets a payload land directly in a strided destination, one run per contiguous piece.
        """
        for dest in dests:
            self.read_into(dest, offset)
            offset += dest.numel()

    def start_read(self, dests: Sequence[torch.Tensor], offset: int) -> Callable[[], None]:
        """Begin :meth:`read_into_runs`; the returned function waits for it and raises what it raised.

        Lets one thread keep the reads of several files in flight. This default reads at once.
        """
        self.read_into_runs(dests, offset)
        return _nothing_pending

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FilesRead:
    """What :meth:`FileBackend.read_files` read of ``n`` files. ``errors[i]`` is None where file ``i`` was read whole:
    its first ``head_bytes`` are ``heads[i]``, the rest is ``bodies[i]``."""

    heads: np.ndarray
    """``[n, head_bytes]`` uint8, in host memory."""
    bodies: Sequence[torch.Tensor]
    """Slices of one buffer on the device asked for, each 4 KiB-aligned (empty for a file not read); :class:`Rows` of
    one view where every body has one length, not zero, as laid out (no file turned out smaller)."""
    sizes: list[int]
    """Each file's size when it was opened, or -1 where it could not be."""
    errors: list[OSError | None]


def body_layout(sizes: np.ndarray, head_bytes: int,
                max_body: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Where :meth:`FileBackend.read_files` puts the files' bodies in one buffer: each body's length (what follows
    the head; 0 for a file shorter than its head, unopened (size < 0) or whose body is ``max_body`` or more), each
    body's offset (4 KiB apart, as GPUDirect likes them), the buffer's length, and which files are not read for
    their size (:func:`too_large`)."""
    n = len(sizes)
    if n and head_bytes < sizes[0] < head_bytes + max_body and (sizes == sizes[0]).all():
        length = int(sizes[0]) - head_bytes  # every file one size (a batch of chunks): the same, in fewer numpy calls
        pitch = align_up(length)
        return (np.full(n, length, dtype=np.int64), np.arange(0, n * pitch, pitch, dtype=np.int64), n * pitch,
                np.zeros(n, dtype=bool))
    lengths = np.clip(sizes - head_bytes, 0, None)
    too_big = lengths >= max_body
    lengths[too_big] = 0
    aligned = (lengths + ALIGN - 1) // ALIGN * ALIGN
    offsets = np.concatenate(([0], np.cumsum(aligned)[:-1])) if len(aligned) else aligned
    return lengths, offsets, int(aligned.sum()), too_big


def too_large(path: str, size: int) -> OSError:
    """The error of a file that :meth:`FileBackend.read_files` does not read: its body is ``max_body`` or more."""
    return OSError(errno.EFBIG, f"{path}: {size} bytes, more than a file to read whole")


def split_body(body: torch.Tensor, lengths: np.ndarray, offsets: np.ndarray) -> Sequence[torch.Tensor]:
    """The slices of ``body`` that :func:`body_layout` gives, by one ``split`` or, where every body has one length,
    as :class:`Rows` of one view (Python per file is the cost here)."""
    if not len(lengths):
        return []
    if lengths[0] and (lengths == lengths[0]).all():
        pitch, length = int(offsets[1]) if len(offsets) > 1 else int(lengths[0]), int(lengths[0])
        used = pitch * len(lengths)
        rows = (body if body.numel() == used else body[:used]).view(len(lengths), pitch)
        return Rows(rows if length == pitch else rows[:, :length])
    gaps = np.diff(np.append(offsets, offsets[-1] + lengths[-1])) - lengths  # each body's padding
    sizes = np.stack([lengths, gaps], axis=1).reshape(-1).tolist()
    return list(body[: sum(sizes)].split(sizes)[0::2])


class FilesInFlight:
    """Files started by :meth:`FileBackend.start_files`: :meth:`finish` or :meth:`abandon` must follow, once. This
    one writes nothing before ``finish``, which hands everything to :meth:`FileBackend.write_files`."""

    def __init__(self, backend: FileBackend, files: Sequence[tuple[str, Sequence[Part]]], durable: bool) -> None:
        self._backend, self._files, self._durable = backend, files, durable

    def finish(self, more: Sequence[Sequence[Part]]) -> list[OSError | None]:
        """Add each file's last parts (``more``, one list per file) and publish every file; per file None or the
        ``OSError`` that kept it from being published."""
        return self._backend.write_files([(path, [*extra, *parts]) for (path, parts), extra in
                                          zip(self._files, more, strict=True)], durable=self._durable)

    def abandon(self) -> None:
        """Publish nothing (what was written is removed once its writes have ended)."""


class FileBackend(abc.ABC):
    """Moves bytes between buffers and files. Thread-safe; owns two thread pools for parallel I/O: one for reads, one
    for the rest (writes), so that a read never queues behind a store's tasks."""

    name: str
    gpu_native: bool = False
    """True when reads land in GPU buffers without a host copy (GDS or cuFile compat)."""
    reads_in_background: bool = False
    """True when :meth:`start_read_files` returns before the reads have landed (so the caller can work meanwhile);
    this default reads them at once."""

    def __init__(self, threads: int = 8) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=f"io-{self.name}")
        self._read_pool = cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=f"io-{self.name}-read")

    @property
    @abc.abstractmethod
    def io_mode(self) -> str:
        """What actually runs: ``gds``, ``cufile-compat``, ``kvikio-posix``, ``posix-odirect`` or ``posix-buffered``."""

    @property
    def batch_reads(self) -> str:
        """What carries :meth:`read_files`: ``per file`` here, ``libgdscache_io`` where one native call takes a
        whole batch (:mod:`io_backends.native`)."""
        return "per file"

    @property
    def batch_writes(self) -> str:
        """What carries :meth:`write_files`: ``per file`` here, ``libgdscache_io`` where one native call writes and
        publishes a whole batch (:mod:`io_backends.native`)."""
        return "per file"

    @abc.abstractmethod
    def write_file(self, path: str, parts: Sequence[Part], *, durable: bool = True) -> None:
        """Atomically publish a new file at ``path`` made of ``parts``.

        The bytes go to a temporary name in the same directory, are fsynced when ``durable``, and
        the temporary file is renamed over ``path``: readers see the old file, the whole new file, or
        nothing. Gaps between parts read as zeros. Raises ``OSError`` (e.g. ``ENOSPC``) and leaves no
        temporary file behind.
        """

    def write_files(self, files: Sequence[tuple[str, Sequence[Part]]], *, durable: bool = True) -> list[OSError | None]:
        """:meth:`write_file` for several files: per file None, or the ``OSError`` that kept it from being published
        (none of it is left behind). Backends that can keep several files' writes in flight and make them durable
        together override this; here they go one by one."""
        errors: list[OSError | None] = []
        for path, parts in files:
            try:
                self.write_file(path, parts, durable=durable)
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        return errors

    def start_files(self, files: Sequence[tuple[str, Sequence[Part]]], *, durable: bool = True) -> FilesInFlight:
        """Start :meth:`write_files` for files whose last parts (a header, say) are not known yet:
        :meth:`FilesInFlight.finish` adds them and publishes every file. Here the writes wait for ``finish``;
        a backend that can write the first parts at once overrides this."""
        return FilesInFlight(self, files, durable)

    @abc.abstractmethod
    def open_read(self, path: str) -> ReadHandle:
        """Open ``path`` for reading. Raises ``FileNotFoundError`` when it is gone."""

    def read_batch(self, reads: Sequence[tuple[ReadHandle, Sequence[torch.Tensor], int]]) -> list[OSError | None]:
        """For each ``(handle, dests, offset)`` of handles this backend opened, :meth:`ReadHandle.read_into_runs`,
        every read in flight at once where the backend can; per read, None or the ``OSError`` that failed it.
        Every read has ended (landed or failed) on return. This default starts each read, then waits for each."""
        errors: list[OSError | None] = [None] * len(reads)
        waits: list[Callable[[], None] | None] = [None] * len(reads)
        try:
            for i, (handle, dests, offset) in enumerate(reads):
                try:
                    waits[i] = handle.start_read(dests, offset)
                except OSError as exc:
                    errors[i] = exc
        finally:
            for i, wait in enumerate(waits):  # every read started lands before its buffers can be reused
                if wait is not None:
                    try:
                        wait()
                    except OSError as exc:
                        errors[i] = exc
        return errors

    def read_files(self, paths: Sequence[str], head_bytes: int, device: torch.device, *, max_body: int,
                   touch: bool = False, sizes: Sequence[int] | None = None) -> FilesRead:
        """Read each file whole, every read in flight at once where the backend can: its first ``head_bytes`` into
        host memory, the rest into one new buffer on ``device`` (:func:`body_layout`). A file whose body would be
        ``max_body`` bytes or more is not read (``EFBIG``; its size is reported). With ``touch``, the times of each
        file read whole are set to now. ``sizes``: each file's size as the caller knows it, which a backend may lay
        out the buffer by before it opens the files (a file grown past its size is then not read: ``ESTALE``)."""
        return self.start_read_files(paths, head_bytes, device, max_body=max_body, touch=touch, sizes=sizes)()

    def start_read_files(self, paths: Sequence[str], head_bytes: int, device: torch.device, *, max_body: int,
                         touch: bool = False, sizes: Sequence[int] | None = None) -> Callable[[], FilesRead]:
        """Begin :meth:`read_files`; the returned function waits for the reads and gives what was read. It must be
        called, once (a backend that reads in the background holds its batch until then). Lets one thread check
        what one batch read while the next is read (:attr:`reads_in_background`). This default opens each file with
        :meth:`open_read` (its size the one that counts: ``sizes`` is not used) and reads them all with
        :meth:`read_batch` before it returns."""
        n = len(paths)
        handles: list[ReadHandle | None] = [None] * n
        errors: list[OSError | None] = [None] * n
        heads = np.zeros((n, head_bytes), dtype=np.uint8)
        try:
            for i, path in enumerate(paths):
                try:
                    handles[i] = self.open_read(path)
                except OSError as exc:
                    errors[i] = exc
            sizes = np.array([-1 if h is None else h.size for h in handles], dtype=np.int64)
            lengths, offsets, total, too_big = body_layout(sizes, head_bytes, max_body)
            bodies = split_body(torch.empty(max(total, 1), dtype=torch.uint8, device=device), lengths, offsets)
            reading = []
            for i, handle in enumerate(handles):
                if handle is not None and too_big[i]:
                    errors[i] = too_large(paths[i], int(sizes[i]))
                elif handle is not None:
                    reading.append(i)
            reads = [(handles[i], [torch.from_numpy(heads[i]), *([bodies[i]] if lengths[i] else [])], 0)
                     for i in reading]
            for i, error in zip(reading, self.read_batch(reads), strict=True):
                errors[i] = error
        finally:
            for handle in handles:
                if handle is not None:
                    handle.close()
        for i, path in enumerate(paths):
            if touch and errors[i] is None:
                with contextlib.suppress(OSError):
                    os.utime(path)
        done = FilesRead(heads, bodies, sizes.tolist(), errors)
        return lambda: done

    def forget(self, path: str) -> None:
        """``path`` was removed or replaced: let go of anything kept open for it (nothing here)."""

    def drop_page_cache(self, path: str) -> None:
        """Ask the kernel to drop cached pages of ``path`` (for cold-read measurements); no root needed."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def submit(self, fn: Callable[..., T], *args: object) -> cf.Future[T]:
        """Run ``fn(*args)`` on the backend's I/O thread pool (writes, and work no caller waits for at once)."""
        return self._pool.submit(fn, *args)

    def submit_read(self, fn: Callable[..., T], *args: object) -> cf.Future[T]:
        """Run ``fn(*args)``, a read a caller waits for, on the backend's read pool: it does not queue behind
        :meth:`submit`'s tasks (a serving engine loads one request's KV while it saves another's)."""
        return self._read_pool.submit(fn, *args)

    def close(self) -> None:
        self._read_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)


class ObjectStore(abc.ABC):
    """Moves bytes between host memory and objects named by string keys (S3, GCS, memory, ...)."""

    name: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``key``; a reader sees the old object, the whole new one, or nothing."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``FileNotFoundError`` when it does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, relative to the store's root."""

    def close(self) -> None:
        """Release connections and threads."""
