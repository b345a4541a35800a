"""kvikio / cuFile backend: chunk files move straight between GPU buffers and storage.

Which path runs, as :func:`detect_io_mode` reports it:

- ``kvikio-posix``: kvikio's own POSIX path, where kvikio prefers it (``KVIKIO_COMPAT_MODE=ON``, or ``AUTO``
  where cuFile is unusable: no libcufile, no udev, WSL) or where the backend sets it (below). GPU buffers go
  through pinned staging: kvikio's bounce buffers in ``task_size`` pieces on its thread pool, or
  ``libgdscache_io.so``'s for batches.
- ``gds``: kvikio drives cuFile and the cuFile driver reports the nvidia-fs module loaded, so DMA
  goes between the storage device and GPU memory. (Where cuFile still serves a file in its compat mode with
  nvidia-fs loaded, say ``force_compat_mode`` in cufile.json or a filesystem nvidia-fs does not handle, this is
  reported too: cuFile does not say so per file.)
- ``cufile-compat``: kvikio drives cuFile, which runs its own compatibility mode (no nvidia-fs); only where the
  user set ``KVIKIO_COMPAT_MODE=OFF``.

Where kvikio would drive cuFile of its own accord (compat mode ``AUTO``), the backend keeps cuFile only for
GPUDirect, and sets kvikio's compat mode ``ON`` (its POSIX path for every file, ``kvikio-posix`` reported) where:

- cuFile would run its own compat mode (no nvidia-fs). That mode opens files ``O_DIRECT``, so no read is ever
  served from the page cache: on a lent H200, 4 GiB of Llama-8B chunks were retrieved warm at 1.62-1.77 GB/s
  through cuFile and at 36.91-38.78 through kvikio's POSIX path and ``libgdscache_io.so``; cold reads were level
  (1.57-1.76 and 1.54-1.79), stores 1.86-2.33 and 1.93-2.05 (benchmarks/RESULTS.md). ``KVIKIO_COMPAT_MODE=OFF``
  keeps cuFile.
- cuFile refuses to register a file in the cache directory (:func:`cufile_refusal`; say, no udev entry to
  identify the block device). kvikio would fall back to POSIX file by file, paying a failed registration on every
  chunk file and reporting a cuFile mode it does not run.

kvikio's settings are process-wide: so is that choice.

In ``kvikio-posix`` mode, where ``libgdscache_io.so`` is built (:mod:`io_backends.native`), a batch of files to read
whole (:meth:`KvikioBackend.start_read_files`: a group of a request's chunk files, each opened, read and closed by
the library's workers: :class:`NativeFilesRead`) and a batch of files to publish (:meth:`KvikioBackend.write_files`)
each go to that library in one call instead of to kvikio file by file: what
kvikio's POSIX path does (pinned staging, buffered preads unless ``o_direct: on``, O_DIRECT writes where aligned
unless ``o_direct: off``), without a Python call per file. Reads with ``o_direct: on``, and all I/O under cuFile,
stay with kvikio.

Only construct :class:`KvikioBackend` where a CUDA driver exists (``make_file_backend`` checks):
kvikio can do no I/O without ``libcuda``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from io_backends import native as native_io
from io_backends.base import (
    FileBackend,
    FilesInFlight,
    FilesRead,
    ForkSafeLock,
    Part,
    ReadHandle,
    body_layout,
    check_buffer,
    fsync_all,
    split_body,
    too_large,
)
from io_backends.posix import temp_path_for

log = logging.getLogger("gdscache")
IO_MODES = ("gds", "cufile-compat", "kvikio-posix")
MiB = 1 << 20


def detect_io_mode(kvikio: ModuleType) -> str:
    """The path kvikio takes for new file handles in this process (one of :data:`IO_MODES`)."""
    if kvikio.defaults.is_compat_mode_preferred():
        return "kvikio-posix"
    import kvikio.cufile_driver

    return "gds" if kvikio.cufile_driver.properties.is_gds_available else "cufile-compat"


def _cufile_only_for_gds(kvikio: ModuleType, mode: str, probe_dir: str | None) -> None:
    """Where kvikio would drive cuFile of its own accord (in io_mode ``mode``), keep cuFile only for GPUDirect that
    registers files in ``probe_dir``; else set kvikio's POSIX path for every file of this process (module
    docstring)."""
    if mode != "gds":
        log.info("cuFile runs without nvidia-fs here: its compat mode reads with O_DIRECT, never from the page cache, "
                 "so kvikio's POSIX path is used (KVIKIO_COMPAT_MODE=OFF keeps cuFile)")
    else:
        refusal = cufile_refusal(probe_dir) if probe_dir is not None else None
        if refusal is None:
            return
        log.warning("cuFile cannot register files in %s (%s); kvikio's POSIX path is used for every file in this "
                    "process", probe_dir, refusal)
    kvikio.defaults.set({"compat_mode": kvikio.CompatMode.ON})


def cufile_refusal(directory: str) -> str | None:
    """Why cuFile cannot register a file in ``directory`` (what it raised), or None where it can, or where this
    cannot be asked (no ``cuda.bindings.cufile``)."""
    try:
        from cuda.bindings import cufile
    except ImportError:
        return None
    try:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".gdscache-cufile-probe-")
    except OSError:  # no file can be made there: cuFile cannot be asked (the first write will say why)
        return None
    os.close(fd)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            return f"O_DIRECT open failed: {exc.strerror}"
        try:
            cufile.driver_open()
            descr = cufile.Descr()
            descr.type = cufile.FileHandleType.OPAQUE_FD
            descr.handle.fd = fd
            descr.fs_ops = 0
            cufile.handle_deregister(cufile.handle_register(descr.ptr))
        except Exception as exc:  # noqa: BLE001 - cuFileError or whatever the bindings raise: a refusal either way
            return f"{type(exc).__name__}: {exc}"
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
    return None


def _os_error(exc: Exception, what: str) -> OSError:
    """kvikio raises RuntimeError for I/O faults: turn it into an OSError with the best errno we can tell."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    code = errno.ENOSPC if "No space left" in text else errno.ENOENT if "No such file" in text else errno.EIO
    return OSError(code, f"{what}: {text}")


def _ready(buf: torch.Tensor) -> None:
    """kvikio copies outside torch's streams: wait for work queued on ``buf`` by this thread's stream (asking first:
    a wait releases and retakes the GIL, which costs more than the question when the stream is idle)."""
    if buf.is_cuda:
        stream = torch.cuda.current_stream(buf.device)
        if not stream.query():
            stream.synchronize()


def _ready_devices(bufs: Iterable[torch.Tensor]) -> None:
    """:func:`_ready` once per CUDA device among ``bufs``: ``libgdscache_io.so`` copies on its own streams, after the
    work this thread queued."""
    for buf in {buf.device: buf for buf in bufs if buf.is_cuda}.values():
        _ready(buf)


def _io_view(buf: torch.Tensor) -> Any:
    """What kvikio accepts: the CUDA tensor itself (``__cuda_array_interface__``) or a host numpy view."""
    return buf if buf.is_cuda else buf.numpy()


class KvikioBackend(FileBackend):
    """Files through kvikio ``CuFile``: read handles kept open between reads (:class:`OpenFiles`), a new handle
    per file written, parts and tasks in flight at once.

    ``threads`` sizes both the backend's pool (parallel file operations) and kvikio's pool (the
    ``task_size`` pieces of each operation in flight); twice as many kvikio threads measured no
    better (benchmarks/results/gds.md). kvikio's settings are process-wide: the last backend built
    sets them.
    ``o_direct``: ``on`` lets kvikio use O_DIRECT for aligned reads and writes; ``off`` never;
    ``auto`` for writes only, so reads can still hit the page cache.
    ``probe_dir``: where files will live; where kvikio would drive cuFile with GPUDirect, one file is registered
    there first, and kvikio's POSIX path is forced if cuFile refuses it (module docstring).
    ``keep_open``: how many files' read handles stay open between reads (:class:`OpenFiles`); by default an eighth
    of the process's file-descriptor limit, at most 1024 (each handle holds two descriptors).
    ``native``: batches of reads and writes may go through ``libgdscache_io.so`` (module docstring); False leaves
    every byte to kvikio.
    """

    name = "kvikio"
    gpu_native = True

    def __init__(
        self,
        threads: int = 8,
        o_direct: Literal["auto", "on", "off"] = "auto",
        task_size: int = 4 * MiB,
        probe_dir: str | None = None,
        keep_open: int | None = None,
        native: bool = True,
    ) -> None:
        if o_direct not in ("auto", "on", "off"):
            raise ValueError(f"o_direct must be 'auto', 'on' or 'off', got {o_direct!r}")
        if task_size < 4096 or task_size % 4096:
            raise ValueError(f"task_size must be a positive multiple of 4096 bytes, got {task_size}")
        import kvikio
        import kvikio.defaults

        super().__init__(threads)
        self._kvikio = kvikio
        kvikio.defaults.set(
            {
                "num_threads": max(1, threads),
                "task_size": task_size,
                "auto_direct_io_write": o_direct != "off",
                "auto_direct_io_read": o_direct == "on",
            }
        )
        mode = detect_io_mode(kvikio)
        if mode != "kvikio-posix" and kvikio.defaults.get("compat_mode") == kvikio.CompatMode.AUTO:
            _cufile_only_for_gds(kvikio, mode, probe_dir)
        self._mode = detect_io_mode(kvikio)  # again: the call above may have set kvikio's POSIX path
        self._threads, self._task_size = max(1, threads), task_size
        self.native_writes = native and self._mode == "kvikio-posix" and native_io.available()
        """Whether batches of files are written and published through ``libgdscache_io.so`` (module docstring)."""
        self.native_reads = self.native_writes and o_direct != "on"
        """Whether batches of reads go through ``libgdscache_io.so`` (its reads are buffered, so ``o_direct: on``
        leaves reads to kvikio)."""
        self._direct_writes = o_direct != "off"
        log.info("kvikio %s backend: io_mode=%s threads=%d task_size=%d o_direct=%s batch_reads=%s batch_writes=%s",
                 kvikio.__version__, self._mode, threads, task_size, o_direct, self.batch_reads, self.batch_writes)
        self._registered: dict[int, torch.Tensor] = {}
        if keep_open is None:
            keep_open = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
        self._open_files = OpenFiles(self._open_handle, keep_open)

    @property
    def io_mode(self) -> str:
        return self._mode

    @property
    def batch_reads(self) -> str:
        return native_io.LIB_NAME.removesuffix(".so") if self.native_reads else "per file"

    @property
    def reads_in_background(self) -> bool:  # type: ignore[override]
        """With :attr:`native_reads`: ``libgdscache_io.so`` reads while the caller works (:class:`NativeFilesRead`)."""
        return self.native_reads

    @property
    def batch_writes(self) -> str:
        return native_io.LIB_NAME.removesuffix(".so") if self.native_writes else "per file"

    def register_buffer(self, buf: torch.Tensor) -> None:
        """Register a long-lived GPU staging buffer with cuFile once (a no-op outside real GDS)."""
        check_buffer(buf)
        if buf.is_cuda and self._mode == "gds" and buf.data_ptr() not in self._registered:
            self._kvikio.memory_register(buf)
            self._registered[buf.data_ptr()] = buf

    def deregister_buffer(self, buf: torch.Tensor) -> None:
        if self._registered.pop(buf.data_ptr(), None) is not None:
            self._kvikio.memory_deregister(buf)

    def write_file(self, path: str, parts: Sequence[Part], *, durable: bool = True) -> None:
        error = self.write_files([(path, parts)], durable=durable)[0]
        if error is not None:
            raise error

    def write_files(self, files: Sequence[tuple[str, Sequence[Part]]], *, durable: bool = True) -> list[OSError | None]:
        """Every file's parts in flight at once, then every file fsynced at once, then each renamed into place
        (:meth:`start_files`, finished at once)."""
        return self.start_files(files, durable=durable).finish([()] * len(files))

    def start_files(self, files: Sequence[tuple[str, Sequence[Part]]], *, durable: bool = True) -> FilesInFlight:
        """Create every file and start writing its parts now: in one call into ``libgdscache_io.so`` with
        :attr:`native_writes`, else on kvikio's pool. ``finish`` waits for them, writes the parts it is given,
        fsyncs every file at once (a journaling filesystem commits them together) and renames each into place."""
        _check_parts(files)  # before any file is created
        if self.native_writes:
            try:
                return _NativeFiles(self, files, durable)
            except OSError as exc:  # no file was created
                log.warning("%s; this batch is written through kvikio", exc)
        return _KvikioFiles(self, files, durable)

    def _start_parts(self, handle: Any, parts: Sequence[Part]) -> Callable[[], None]:
        """Host bytes go by pwrite now; buffers go to kvikio, all parts in flight together. The returned function
        waits for them."""
        pending: list[tuple[int, int, Any]] = []
        wait = _waiter(pending, "write")
        try:
            for part in parts:
                if part.nbytes == 0:
                    continue
                if isinstance(part.data, (bytes, bytearray)):
                    view, offset = memoryview(part.data), part.offset
                    while len(view):
                        done = os.pwrite(handle.fileno(), view, offset)
                        view, offset = view[done:], offset + done
                    continue
                _ready(part.data)
                pending.append((part.nbytes, part.offset, handle.pwrite(_io_view(part.data), part.nbytes, part.offset)))
        except BaseException:
            with contextlib.suppress(Exception):
                wait()  # the parts already submitted must land before the caller reuses their buffers
            raise
        return wait

    def open_read(self, path: str) -> ReadHandle:
        """A handle on ``path``, kept open for later reads while the path names the same file (:class:`OpenFiles`)."""
        return _KvikioReadHandle(self._open_files, self._open_files.acquire(path))

    def start_read_files(self, paths: Sequence[str], head_bytes: int, device: torch.device, *, max_body: int,
                         touch: bool = False, sizes: Sequence[int] | None = None) -> Callable[[], FilesRead]:
        """With :attr:`native_reads`, :class:`NativeFilesRead`; else kvikio's, file by file
        (:meth:`FileBackend.start_read_files`)."""
        if self.native_reads:
            try:
                return NativeFilesRead(paths, head_bytes, device, max_body=max_body, touch=touch,
                                       threads=self._threads, piece_bytes=self._task_size, sizes=sizes)
            except OSError as exc:  # the library could not start the reads (no worker, no memory): kvikio reads them
                log.warning("%s; this batch is read through kvikio", exc)
        return super().start_read_files(paths, head_bytes, device, max_body=max_body, touch=touch)

    def _open_handle(self, path: str) -> Any:
        try:
            return self._kvikio.CuFile(path, "r")
        except RuntimeError as exc:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, "no such chunk file", path) from exc
            raise _os_error(exc, f"cannot open {path}") from exc

    def forget(self, path: str) -> None:
        self._open_files.forget(path)

    def close(self) -> None:
        for buf in list(self._registered.values()):
            self.deregister_buffer(buf)
        super().close()
        self._open_files.close()


_NOWAIT_READS = hasattr(os, "RWF_NOWAIT")
"""Whether ``preadv(RWF_NOWAIT)`` may work here; cleared for the process where the kernel or filesystem refuses it."""


class NativeFilesRead:
    """:meth:`FileBackend.start_read_files` in one call into ``libgdscache_io.so`` whatever the number of files
    (:func:`native_io.begin_read_files`): its workers open each file, check its size, read its head and body, and
    close it (touched where asked, if read whole); calling this waits for them. No Python runs per file, and no file
    is opened or closed on the caller's thread. The files' sizes lay out the buffer before they are opened: ``sizes``
    where the caller knows them (a file grown past its size is then not read: ``ESTALE``), else a ``stat`` each."""

    def __init__(self, paths: Sequence[str], head_bytes: int, device: torch.device, *, max_body: int, touch: bool,
                 threads: int, piece_bytes: int, sizes: Sequence[int] | None = None) -> None:
        self._paths = paths
        self._known = np.array(sizes if sizes is not None else [_size_of(path) for path in paths], dtype=np.int64)
        n = len(paths)
        lengths, offsets, total, self._too_big = body_layout(self._known, head_bytes, max_body)
        self._reading = np.flatnonzero((self._known >= 0) & ~self._too_big)
        body = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        self._heads = np.zeros((n, head_bytes), dtype=np.uint8)
        files = np.zeros(len(self._reading), dtype=native_io.WHOLE)
        files["size"], files["device"], files["touch"] = self._known[self._reading], body.get_device(), touch
        files["head"] = np.uint64(self._heads.ctypes.data) + (self._reading * head_bytes).astype(np.uint64)
        files["body"] = np.uint64(body.data_ptr()) + offsets[self._reading].astype(np.uint64)
        self._bodies = split_body(body, lengths, offsets)
        _ready(body)
        every = len(self._reading) == n
        self._reads: native_io.ReadsInFlight | None = native_io.begin_read_files(
            paths if every else [paths[i] for i in self._reading.tolist()], files, head_bytes, threads=threads,
            piece_bytes=piece_bytes, keep=(body, self._heads))

    def __call__(self) -> FilesRead:
        if self._reads is None:
            raise RuntimeError("these reads were already finished")
        reads, self._reads = self._reads, None
        files = reads.finish()
        results, sizes = np.minimum(self._known, 0), self._known.copy()  # a failed stat's -errno, or 0
        results[self._reading], sizes[self._reading] = files["result"], files["size"]
        shrunk = np.flatnonzero((sizes != self._known) & (sizes >= 0)).tolist()  # smaller than laid out
        bodies = list(self._bodies) if shrunk else self._bodies
        for i in shrunk:
            bodies[i] = bodies[i][: max(0, int(sizes[i]) - self._heads.shape[1])]
        errors: list[OSError | None] = [None] * len(self._paths)
        for i in np.flatnonzero((results < 0) | self._too_big).tolist():
            errors[i] = too_large(self._paths[i], int(sizes[i])) if self._too_big[i] else \
                native_io.error_of(int(results[i]), f"read of {self._paths[i]}")
        return FilesRead(self._heads, bodies, np.maximum(sizes, -1).tolist(), errors)


def _size_of(path: str) -> int:
    """The size of the file at ``path``, or ``-errno`` where it cannot be known."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        return -(exc.errno or errno.EIO)


def _read_if_cached(fd: int, dest: torch.Tensor, offset: int) -> bool:
    """Fill host buffer ``dest`` from ``offset`` only if the page cache holds all of it (``RWF_NOWAIT``: no disk
    wait); False where it did not (the caller reads it another way, overwriting any part copied)."""
    global _NOWAIT_READS
    if not _NOWAIT_READS or dest.numel() == 0:
        return False
    try:
        return os.preadv(fd, [dest.numpy()], offset, os.RWF_NOWAIT) == dest.numel()
    except BlockingIOError:  # not all cached
        return False
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _NOWAIT_READS = False
        return False


def _waiter(pending: list[tuple[int, int, Any]], verb: str) -> Callable[[], None]:
    """A function that waits for every kvikio future in ``pending`` (``(nbytes, offset, future)``, filled later),
    even after one failed, then raises the first failure as an ``OSError``."""

    def wait() -> None:
        failure: OSError | None = None
        for nbytes, offset, future in pending:
            try:
                done = future.get()
            except Exception as exc:  # noqa: BLE001 - whatever kvikio raises, every future is still waited for
                failure = failure or _os_error(exc, f"{verb} of {nbytes} bytes at offset {offset} failed")
                continue
            if done != nbytes and failure is None:
                failure = OSError(errno.EIO, f"short {verb}: {done} of {nbytes} bytes at offset {offset}")
        if failure is not None:
            raise failure

    return wait


def _check_parts(files: Sequence[tuple[str, Sequence[Part]]]) -> None:
    for path, parts in files:
        for part in parts:
            if not isinstance(part.data, (bytes, bytearray)):
                check_buffer(part.data, f"part at offset {part.offset} of {path}")


def _check_more(files: Sequence[tuple[str, Sequence[Part]]], more: Sequence[Sequence[Part]]) -> None:
    """Check the parts given to ``finish``: one list per file, each part bytes or a buffer :func:`check_buffer`
    accepts."""
    if len(more) != len(files):
        raise ValueError(f"finish takes one list of parts per file: {len(files)} files, {len(more)} lists")
    _check_parts([(path, extra) for (path, _), extra in zip(files, more, strict=True)])


def _write_rows(files: Sequence[Sequence[Part]], held: list[np.ndarray]) -> np.ndarray:
    """The :data:`~io_backends.native.WRANGE` rows of each file's parts (``files[i]`` is file ``i``'s); host bytes
    are kept alive in ``held``. Waits for work this thread queued on GPU sources (the library copies on its own
    streams)."""
    rows: list[tuple[int, int, int, int, int]] = []
    for i, parts in enumerate(files):
        for part in parts:
            if part.nbytes == 0:
                continue
            if isinstance(part.data, (bytes, bytearray)):
                held.append(np.frombuffer(part.data, dtype=np.uint8))
                rows.append((i, -1, part.offset, part.nbytes, held[-1].ctypes.data))
                continue
            buf = part.data
            rows.append((i, buf.get_device(), part.offset, part.nbytes, buf.data_ptr()))  # -1: host memory
    _ready_devices(part.data for parts in files for part in parts if isinstance(part.data, torch.Tensor))
    return np.array(rows, dtype=native_io.WRANGE)


class _NativeFiles(FilesInFlight):
    """Files written by ``libgdscache_io.so`` (:meth:`KvikioBackend.start_files`): their first parts from the start,
    the parts given to :meth:`finish` once those have landed; then each is fsynced, closed and renamed."""

    def __init__(self, backend: KvikioBackend, files: Sequence[tuple[str, Sequence[Part]]], durable: bool) -> None:
        super().__init__(backend, files, durable)
        self._held: list[np.ndarray] = []
        self._writing = native_io.begin_write([(temp_path_for(path), path) for path, _ in files],
                                              _write_rows([parts for _, parts in files], self._held),
                                              threads=backend._threads, piece_bytes=backend._task_size,
                                              durable=durable, direct=backend._direct_writes, keep=(files, self._held))

    def finish(self, more: Sequence[Sequence[Part]]) -> list[OSError | None]:
        try:
            _check_more(self._files, more)
            rows = _write_rows(more, self._held)
        except BaseException:
            self.abandon()
            raise
        results = self._writing.finish(rows)
        errors = [native_io.error_of(result, f"write of {path}") for (path, _), result in zip(self._files, results,
                                                                                          strict=True)]
        for (path, _), error in zip(self._files, errors, strict=True):
            if error is None:
                self._backend.forget(path)
        return errors

    def abandon(self) -> None:
        self._writing.abandon()


class _KvikioFiles(FilesInFlight):
    """Files written through kvikio (:meth:`KvikioBackend.start_files`): each created and its first parts in flight
    from the start; :meth:`finish` waits for them, then writes the last parts (after the first: on ext4 a buffered
    write waits for the file's extending O_DIRECT write in flight), fsyncs every file at once and renames each."""

    _backend: KvikioBackend

    def __init__(self, backend: KvikioBackend, files: Sequence[tuple[str, Sequence[Part]]], durable: bool) -> None:
        super().__init__(backend, files, durable)
        self._errors: list[OSError | None] = [None] * len(files)
        self._writings: list[_Writing | None] = [None] * len(files)  # None where the file could not be created
        try:
            for i, (path, parts) in enumerate(files):
                tmp = temp_path_for(path)
                try:
                    self._writings[i] = _Writing(i, tmp, backend._kvikio.CuFile(tmp, "w"))
                except RuntimeError as exc:
                    self._errors[i] = _os_error(exc, f"cannot create {tmp}")
                    continue
                self._start(i, parts)
        except BaseException:
            self._end(abandon=True)
            raise

    def finish(self, more: Sequence[Sequence[Part]]) -> list[OSError | None]:
        try:
            _check_more(self._files, more)
            self._wait()
            for i, extra in enumerate(more):
                if extra and self._errors[i] is None:
                    self._start(i, extra)
            self._wait()
            if self._durable:
                synced = [w for w in self._live() if self._errors[w.index] is None]
                for writing, error in zip(synced, fsync_all([w.handle.fileno() for w in synced]), strict=True):
                    self._errors[writing.index] = error
        except BaseException:
            self._end(abandon=True)
            raise
        self._end(abandon=False)
        return self._errors

    def abandon(self) -> None:
        self._end(abandon=True)

    def __del__(self) -> None:
        if any(w is not None for w in getattr(self, "_writings", ())):  # dropped unfinished: leave nothing behind
            log.warning("a batch of %d file(s) was dropped unfinished; its files are removed", len(self._files))
            self._end(abandon=True)

    def _live(self) -> list[_Writing]:
        return [w for w in self._writings if w is not None]

    def _start(self, i: int, parts: Sequence[Part]) -> None:
        writing = self._writings[i]
        assert writing is not None
        try:
            writing.wait = self._backend._start_parts(writing.handle, parts)
        except (OSError, RuntimeError) as exc:
            self._errors[i] = _os_error(exc, f"write of {self._files[i][0]} failed")

    def _wait(self) -> None:
        """Wait for every write started: each lands before its buffers can go back to the caller."""
        for writing in self._live():
            try:
                writing.finish()
            except OSError as exc:  # what _waiter raises
                self._errors[writing.index] = self._errors[writing.index] or exc

    def _end(self, *, abandon: bool) -> None:
        """Close every file and rename each that succeeded into place (none where ``abandon``); unlink the rest."""
        writings, self._writings = self._live(), [None] * len(self._files)
        for writing in writings:
            if abandon:
                self._errors[writing.index] = self._errors[writing.index] or OSError(errno.ECANCELED, "write abandoned")
                with contextlib.suppress(Exception):
                    writing.finish()
            writing.handle.close()
            if self._errors[writing.index] is None:
                path = self._files[writing.index][0]
                try:
                    os.rename(writing.tmp, path)
                    self._backend.forget(path)
                    continue
                except OSError as exc:
                    self._errors[writing.index] = exc
            with contextlib.suppress(OSError):
                os.unlink(writing.tmp)


class _Writing:
    """One file of :meth:`KvikioBackend.write_files` in progress: its temporary name, handle and pending writes."""

    def __init__(self, index: int, tmp: str, handle: Any) -> None:
        self.index, self.tmp, self.handle = index, tmp, handle
        self.wait: Callable[[], None] | None = None

    def finish(self) -> None:
        """Wait for the writes started (once); raises what they raised."""
        wait, self.wait = self.wait, None
        if wait is not None:
            wait()


class _OpenFile:
    """A kvikio handle that :class:`OpenFiles` keeps: the file's identity and size, and how many reads use it."""

    def __init__(self, handle: Any) -> None:
        try:
            st = os.fstat(handle.fileno())
        except OSError:
            handle.close()
            raise
        self.handle, self.ident, self.size = handle, (st.st_dev, st.st_ino), st.st_size
        self.users = 1
        self.kept = False


class OpenFiles:
    """Read handles kept open between reads: up to ``capacity`` files, the least recently used let go first.

    Opening a file through kvikio costs two ``open`` calls (and, under GDS, a cuFile registration); chunk files
    are read again and again and never change once published (a rewrite renames a new inode over the path). A kept
    handle is used only while ``stat(path)`` still gives the inode it holds open, so a file replaced or deleted
    before a read begins is reopened or missed (one replaced during a read is read whole from the file it was).
    :meth:`forget` lets go of a file at once (its owner removed it: the handle would keep its disk space allocated);
    files that another process deletes are let go of at the next read of their path, or by a sweep at most every
    ``SWEEP_S`` seconds. A handle in use is closed when its last reader is done.
    """

    SWEEP_S = 5.0

    def __init__(self, opener: Callable[[str], Any], capacity: int) -> None:
        self._opener = opener
        self.capacity = capacity
        self._kept: OrderedDict[str, _OpenFile] = OrderedDict()
        self._lock = ForkSafeLock()
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return len(self._kept)

    def acquire(self, path: str) -> _OpenFile:
        """The open file at ``path`` (kept or newly opened); pass it to :meth:`release` when done."""
        try:
            st = os.stat(path)
        except FileNotFoundError:  # removed behind our back: its handle must not hold the inode any longer
            self.forget(path)
            raise
        with self._lock:
            if time.monotonic() - self._swept > self.SWEEP_S:
                self._sweep()
            entry = self._kept.get(path)
            if entry is not None and entry.ident == (st.st_dev, st.st_ino):
                self._kept.move_to_end(path)
                entry.users += 1
                return entry
        entry = _OpenFile(self._opener(path))
        with self._lock:
            self._let_go(path)  # another inode (or another thread's handle on this one): the new one is kept
            if self.capacity > 0:
                entry.kept = True
                self._kept[path] = entry
                while len(self._kept) > self.capacity:
                    self._let_go(next(iter(self._kept)))
        return entry

    def release(self, entry: _OpenFile) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users == 0 and not entry.kept:
                entry.handle.close()

    def forget(self, path: str) -> None:
        with self._lock:
            self._let_go(path)

    def close(self) -> None:
        with self._lock:
            for path in list(self._kept):
                self._let_go(path)

    def _sweep(self) -> None:
        """Let go of kept files that no longer have a name (deleted by another process; under the lock)."""
        self._swept = time.monotonic()
        for path in [path for path, entry in self._kept.items() if _unlinked(entry.handle)]:
            self._let_go(path)

    def _let_go(self, path: str) -> None:
        """Stop keeping ``path``'s handle (under the lock); close it unless a read still uses it."""
        entry = self._kept.pop(path, None)
        if entry is not None:
            entry.kept = False
            if entry.users == 0:
                entry.handle.close()


def _unlinked(handle: Any) -> bool:
    try:
        return os.fstat(handle.fileno()).st_nlink == 0
    except OSError:
        return True


class _KvikioReadHandle(ReadHandle):
    """One read of an open ``CuFile``: the header by pread to host, payloads by kvikio into host or GPU buffers."""

    def __init__(self, files: OpenFiles, entry: _OpenFile) -> None:
        self._files, self._entry = files, entry
        self._handle = entry.handle
        self.size = entry.size
        self._closed = False

    def read_bytes(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._handle.fileno(), nbytes, offset)
        while len(data) < nbytes:
            more = os.pread(self._handle.fileno(), nbytes - len(data), offset + len(data))
            if not more:
                raise OSError(errno.EIO, f"short read: {len(data)} of {nbytes} bytes at offset {offset}")
            data += more
        return data

    def read_into(self, dest: torch.Tensor, offset: int) -> None:
        check_buffer(dest, "dest")
        n = dest.numel()
        if offset + n > self.size:
            raise OSError(errno.EIO, f"short file: need {offset + n} bytes, file has {self.size}")
        if n == 0:
            return
        _ready(dest)
        try:
            got = self._handle.pread(_io_view(dest), n, offset).get()
        except RuntimeError as exc:
            raise _os_error(exc, f"read of {n} bytes at offset {offset} failed") from exc
        if got != n:
            raise OSError(errno.EIO, f"short read: {got} of {n} bytes at offset {offset}")

    def read_into_runs(self, dests: Sequence[torch.Tensor], offset: int) -> None:
        """All runs in flight at once on kvikio's thread pool, straight into host or GPU memory."""
        self.start_read(dests, offset)()

    def start_read(self, dests: Sequence[torch.Tensor], offset: int) -> Callable[[], None]:
        """Submit every run to kvikio's pool now, GPU runs first; the returned function waits for them all. A host
        run whose bytes the page cache holds (a chunk header, most often) is then copied at once by one non-blocking
        ``preadv`` while the GPU runs are under way."""
        starts, end = [], offset
        for dest in dests:
            check_buffer(dest, "dest")
            starts.append(end)
            end += dest.numel()
        if end > self.size:
            raise OSError(errno.EIO, f"short file: need {end} bytes, file has {self.size}")
        pending: list[tuple[int, int, Any]] = []
        wait = _waiter(pending, "read")
        cuda = next((d for d in dests if d.is_cuda), None)
        if cuda is not None:
            _ready(cuda)
        try:
            for i in sorted(range(len(dests)), key=lambda i: not dests[i].is_cuda):
                dest, at = dests[i], starts[i]
                if not dest.is_cuda and _read_if_cached(self._handle.fileno(), dest, at):
                    continue
                pending.append((dest.numel(), at, self._handle.pread(_io_view(dest), dest.numel(), at)))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                wait()  # the runs already submitted must land before the caller reuses their buffers
            if isinstance(exc, RuntimeError):
                raise _os_error(exc, f"scatter read of {end - offset} bytes failed") from exc
            raise
        return wait

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._files.release(self._entry)
