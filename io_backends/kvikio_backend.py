"""kvikio / cuFile backend: chunk files move straight between GPU buffers and storage.

Which path runs is kvikio's decision, reported by :func:`detect_io_mode`:

- ``kvikio-posix``: kvikio prefers its own POSIX path (``KVIKIO_COMPAT_MODE=ON``, or ``AUTO`` where
  cuFile is unusable: no libcufile, no nvidia-fs/udev access, WSL). GPU buffers go through kvikio's
  pinned bounce buffers, split into ``task_size`` pieces on kvikio's thread pool.
- ``gds``: kvikio drives cuFile and the cuFile driver reports the nvidia-fs module loaded, so DMA
  goes between the storage device and GPU memory.
- ``cufile-compat``: kvikio drives cuFile, but cuFile runs its own compatibility mode (no nvidia-fs).

Only construct :class:`KvikioBackend` where a CUDA driver exists (``make_file_backend`` checks):
kvikio can do no I/O without ``libcuda``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Literal

import torch

from io_backends.base import FileBackend, Part, ReadHandle, check_buffer, sync_together
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


def _os_error(exc: Exception, what: str) -> OSError:
    """kvikio raises RuntimeError for I/O faults: turn it into an OSError with the best errno we can tell."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    code = errno.ENOSPC if "No space left" in text else errno.ENOENT if "No such file" in text else errno.EIO
    return OSError(code, f"{what}: {text}")


def _ready(buf: torch.Tensor) -> None:
    """kvikio copies outside torch's streams: wait for work queued on ``buf`` by this thread's stream."""
    if buf.is_cuda:
        torch.cuda.current_stream(buf.device).synchronize()


def _io_view(buf: torch.Tensor) -> Any:
    """What kvikio accepts: the CUDA tensor itself (``__cuda_array_interface__``) or a host numpy view."""
    return buf if buf.is_cuda else buf.numpy()


class KvikioBackend(FileBackend):
    """Files through kvikio ``CuFile``: one handle per file operation, parts and tasks in flight at once.

    ``threads`` sizes both the backend's pool (parallel file operations) and kvikio's pool (the
    ``task_size`` pieces of each operation in flight); twice as many kvikio threads measured no
    better (benchmarks/results/gds.md). kvikio's settings are process-wide: the last backend built
    sets them.
    ``o_direct``: ``on`` lets kvikio use O_DIRECT for aligned reads and writes; ``off`` never;
    ``auto`` for writes only, so reads can still hit the page cache.
    """

    name = "kvikio"
    gpu_native = True

    def __init__(
        self,
        threads: int = 8,
        o_direct: Literal["auto", "on", "off"] = "auto",
        task_size: int = 4 * MiB,
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
        self._mode = detect_io_mode(kvikio)
        log.info("kvikio %s backend: io_mode=%s threads=%d task_size=%d o_direct=%s",
                 kvikio.__version__, self._mode, threads, task_size, o_direct)
        self._registered: dict[int, torch.Tensor] = {}

    @property
    def io_mode(self) -> str:
        return self._mode

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
        """Every file's parts in flight at once on kvikio's pool, then one sync for all of them
        (:func:`~io_backends.base.sync_together`), then each renamed into place."""
        errors: list[OSError | None] = [None] * len(files)
        started: list[tuple[int, str, Any, Callable[[], None] | None]] = []  # index, temp name, handle, wait
        for i, (path, parts) in enumerate(files):
            for part in parts:
                if not isinstance(part.data, (bytes, bytearray)):
                    check_buffer(part.data, f"part at offset {part.offset}")
            tmp = temp_path_for(path)
            try:
                handle = self._kvikio.CuFile(tmp, "w")
            except RuntimeError as exc:
                errors[i] = _os_error(exc, f"cannot create {tmp}")
                continue
            try:
                started.append((i, tmp, handle, self._start_parts(handle, parts)))
            except (OSError, RuntimeError) as exc:
                errors[i] = _os_error(exc, f"write of {path} failed")
                started.append((i, tmp, handle, None))
        try:
            for i, _, _, wait in started:  # every write lands before its buffers can go back to the caller
                if wait is not None:
                    try:
                        wait()
                    except (OSError, RuntimeError) as exc:
                        errors[i] = _os_error(exc, f"write of {files[i][0]} failed")
            if durable:
                written = [handle.fileno() for i, _, handle, _ in started if errors[i] is None]
                try:
                    sync_together(written)
                except OSError as exc:
                    for i, _, _, _ in started:
                        errors[i] = errors[i] or exc
        finally:
            for _, _, handle, _ in started:
                handle.close()
        for i, tmp, _, _ in started:
            if errors[i] is None:
                try:
                    os.rename(tmp, files[i][0])
                    continue
                except OSError as exc:
                    errors[i] = exc
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return errors

    def _start_parts(self, handle: Any, parts: Sequence[Part]) -> Callable[[], None]:
        """Host bytes go by pwrite now; buffers go to kvikio, all parts in flight together. The returned function
        waits for them."""
        pending = []

        def wait() -> None:
            failure: Exception | None = None
            for part, future in pending:  # every submitted part is waited for, even after a failure
                try:
                    done = future.get()
                except RuntimeError as exc:
                    failure = failure or exc
                    continue
                if done != part.nbytes and failure is None:
                    failure = OSError(errno.EIO, f"short write: {done} of {part.nbytes} bytes at offset {part.offset}")
            if failure is not None:
                raise failure

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
            try:
                pending.append((part, handle.pwrite(_io_view(part.data), part.nbytes, part.offset)))
            except RuntimeError:
                with contextlib.suppress(OSError, RuntimeError):
                    wait()
                raise
        return wait

    def open_read(self, path: str) -> ReadHandle:
        try:
            handle = self._kvikio.CuFile(path, "r")
        except RuntimeError as exc:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, "no such chunk file", path) from exc
            raise _os_error(exc, f"cannot open {path}") from exc
        return _KvikioReadHandle(handle)

    def close(self) -> None:
        for buf in list(self._registered.values()):
            self.deregister_buffer(buf)
        super().close()


class _KvikioReadHandle(ReadHandle):
    """One open ``CuFile``: the header by pread to host, payloads by kvikio into host or GPU buffers."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.size = os.fstat(handle.fileno()).st_size

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
        """Submit every run to kvikio's pool now; the returned function waits for them all."""
        total = sum(d.numel() for d in dests)
        if offset + total > self.size:
            raise OSError(errno.EIO, f"short file: need {offset + total} bytes, file has {self.size}")
        pending = []

        def wait() -> None:
            failure: Exception | None = None
            for n, at, future in pending:  # every submitted run is waited for, even after a failure
                try:
                    if future.get() != n and failure is None:
                        failure = OSError(errno.EIO, f"short read of {n} bytes at offset {at}")
                except RuntimeError as exc:
                    failure = failure or _os_error(exc, f"scatter read of {total} bytes failed")
            if failure is not None:
                raise failure

        for dest in dests:
            check_buffer(dest, "dest")
        cuda = next((d for d in dests if d.is_cuda), None)
        if cuda is not None:
            _ready(cuda)
        for dest in dests:
            try:
                pending.append((dest.numel(), offset, self._handle.pread(_io_view(dest), dest.numel(), offset)))
            except RuntimeError as exc:
                with contextlib.suppress(OSError):
                    wait()  # the runs already submitted must land before the caller reuses their buffers
                raise _os_error(exc, f"scatter read of {total} bytes failed") from exc
            offset += dest.numel()
        return wait

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
