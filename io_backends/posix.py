"""POSIX file I/O: pread/pwrite on a thread pool, O_DIRECT where the filesystem allows it.

Works everywhere, needs no CUDA driver. GPU buffers pass through a pinned host bounce buffer.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from typing import Literal

import torch

from io_backends.base import ALIGN, FileBackend, Part, ReadHandle, align_up
from io_backends.buffers import BounceBuffers, cuda_usable, host_pool, is_aligned

log = logging.getLogger(__name__)
_HOST = socket.gethostname().replace(".", "_")
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_IOV_MAX = 512
_STAGE_MAX = 1 << 20


def temp_path_for(path: str) -> str:
    """A unique temporary name beside ``path``: ``.<name>.<host>.<pid>.<random>.tmp``."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _host_view(data: bytes | torch.Tensor) -> memoryview:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data)
    if data.is_cuda:
        data = data.cpu()
    return memoryview(data.numpy())


def _coalesce(parts: Sequence[Part]) -> torch.Tensor:
    """All parts in one page-aligned host buffer, gaps and tail zeroed (for O_DIRECT with unaligned parts)."""
    total = max(p.offset + p.nbytes for p in parts)
    buf = host_pool.acquire(align_up(total))
    at = 0
    for part in sorted(parts, key=lambda p: p.offset):
        if part.offset > at:
            buf[at : part.offset].zero_()
        data = part.data
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, (bytes, bytearray)) else data
        buf[part.offset : part.offset + part.nbytes].copy_(src)
        at = max(at, part.offset + part.nbytes)
    buf[at:].zero_()
    return buf


def _stage_small(parts: Sequence[Part]) -> tuple[list[Part], list[torch.Tensor]]:
    """Copy small byte strings at aligned offsets and lengths (a chunk header) into aligned pooled buffers.

    With O_DIRECT a byte string cannot join a ``pwritev``; staged, it goes out in the same request as the
    payload after it instead of as a separate synchronous write. Returns the parts and the staged buffers.
    """
    out: list[Part] = []
    staged: list[torch.Tensor] = []
    for part in parts:
        data = part.data
        if isinstance(data, (bytes, bytearray)) and 0 < len(data) <= _STAGE_MAX and len(data) % ALIGN == 0 \
                and part.offset % ALIGN == 0:
            buf = host_pool.acquire(len(data))
            memoryview(buf.numpy())[:] = data
            staged.append(buf)
            part = Part(part.offset, buf)
        out.append(part)
    return out, staged


def _gatherable(part: Part, direct: bool) -> bool:
    """Host bytes that can go to the file as they are (with O_DIRECT: a tensor of aligned address and length)."""
    data = part.data
    if not isinstance(data, torch.Tensor):
        return not direct
    if data.is_cuda:
        return False
    return not direct or (is_aligned(data) and part.nbytes % ALIGN == 0 and part.offset % ALIGN == 0)


def _advance(views: list[memoryview], nbytes: int) -> None:
    """Drop the first ``nbytes`` from a list of buffers after a partial vectored read or write."""
    while views and nbytes >= len(views[0]):
        nbytes -= len(views.pop(0))
    if views and nbytes:
        views[0] = views[0][nbytes:]


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    views = list(views)
    while views:
        done = os.pwritev(fd, views, offset)
        offset += done
        _advance(views, done)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total:]], offset + total)
        if got == 0:
            break
        total += got
    return total


class PosixBackend(FileBackend):
    """pread/pwrite with optional O_DIRECT and per-thread aligned bounce buffers."""

    name = "posix"

    def __init__(self, threads: int = 8, o_direct: Literal["auto", "on", "off"] = "auto") -> None:
        super().__init__(threads)
        if o_direct not in ("auto", "on", "off"):
            raise ValueError(f"o_direct must be 'auto', 'on' or 'off', got {o_direct!r}")
        self._o_direct = o_direct if _O_DIRECT else "off"
        self._direct_by_dir: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._bounce = BounceBuffers(pin=cuda_usable())
        self._last_direct = self._o_direct != "off"

    @property
    def io_mode(self) -> str:
        return "posix-odirect" if self._last_direct else "posix-buffered"

    def _open(self, path: str, flags: int) -> tuple[int, bool]:
        """Open with O_DIRECT when configured and supported by this directory's filesystem."""
        directory = os.path.dirname(path)
        want = self._o_direct != "off" and self._direct_by_dir.get(directory, True)
        if want:
            try:
                fd = os.open(path, flags | _O_DIRECT, 0o644)
                self._direct_by_dir[directory] = True
                self._last_direct = True
                return fd, True
            except OSError as exc:
                if exc.errno != errno.EINVAL or self._o_direct == "on":
                    raise
                with self._lock:
                    if directory not in self._direct_by_dir:
                        log.info("O_DIRECT unsupported under %s; using buffered I/O", directory)
                    self._direct_by_dir[directory] = False
        self._last_direct = False
        return os.open(path, flags, 0o644), False

    def write_file(self, path: str, parts: Sequence[Part], *, durable: bool = True) -> None:
        tmp = temp_path_for(path)
        fd, direct = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        staged: list[torch.Tensor] = []
        try:
            if direct:
                parts, staged = _stage_small(parts)
                if not all(_gatherable(part, True) for part in parts):
                    # unaligned offsets, or caller memory off a page boundary (torch's CPU tensors are 64-byte
                    # aligned): one aligned copy of the whole file and one request, not a bounced write per run
                    whole = _coalesce(parts)
                    for buf in staged:
                        host_pool.release(buf)
                    staged, parts = [whole], [Part(0, whole)]
            self._write_parts(fd, sorted(parts, key=lambda p: p.offset), direct)
            if durable:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            for buf in staged:
                host_pool.release(buf)

    def _write_parts(self, fd: int, parts: Sequence[Part], direct: bool) -> None:
        """Consecutive host buffers go out in one ``pwritev``; the rest (GPU tensors, buffered I/O only: with
        O_DIRECT ``write_file`` hands over only gatherable parts) part by part."""
        batch: list[memoryview] = []
        start = end = 0
        for part in parts:
            if _gatherable(part, direct) and (not batch or part.offset == end) and len(batch) < _IOV_MAX:
                if not batch:
                    start = part.offset
                batch.append(_host_view(part.data))
                end = part.offset + part.nbytes
                continue
            if batch:
                _pwritev_all(fd, batch, start)
                batch = []
            if _gatherable(part, direct):
                batch, start, end = [_host_view(part.data)], part.offset, part.offset + part.nbytes
            else:
                _pwrite_all(fd, _host_view(part.data), part.offset)
        if batch:
            _pwritev_all(fd, batch, start)

    def open_read(self, path: str) -> ReadHandle:
        fd, direct = self._open(path, os.O_RDONLY)
        return _PosixReadHandle(self, fd, direct)


class _PosixReadHandle(ReadHandle):
    def __init__(self, backend: PosixBackend, fd: int, direct: bool) -> None:
        self._backend = backend
        self._fd = fd
        self._direct = direct
        self.size = os.fstat(fd).st_size

    def read_bytes(self, offset: int, nbytes: int) -> bytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_into(buf, offset)
        return bytes(buf.numpy())

    def read_into(self, dest: torch.Tensor, offset: int) -> None:
        n = dest.numel()
        if offset + n > self.size:
            raise OSError(errno.EIO, f"short file: need {offset + n} bytes, file has {self.size}")
        direct_ok = not self._direct or offset % ALIGN == 0
        if not direct_ok:
            raise ValueError(f"O_DIRECT read offset {offset} is not {ALIGN}-aligned")
        if not dest.is_cuda and (not self._direct or (is_aligned(dest) and n % ALIGN == 0)):
            got = _pread_all(self._fd, memoryview(dest.numpy()), offset)
        else:
            span = align_up(n) if self._direct else n
            bounce = self._backend._bounce.get(span)
            got = min(_pread_all(self._fd, memoryview(bounce.numpy()), offset), n)
            dest.copy_(bounce[:n])
        if got < n:
            raise OSError(errno.EIO, f"short read: {got} of {n} bytes at offset {offset}")

    def read_into_runs(self, dests: Sequence[torch.Tensor], offset: int) -> None:
        """One ``preadv`` into every host run (with O_DIRECT: when the runs are aligned), else staged."""
        total = sum(d.numel() for d in dests)
        direct_ok = not self._direct or (offset % ALIGN == 0 and all(is_aligned(d) and d.numel() % ALIGN == 0 for d in dests))
        if any(d.is_cuda for d in dests) or not direct_ok:  # stage in one aligned host buffer
            staging = host_pool.acquire(total)
            try:
                self.read_into(staging, offset)
                for dest, piece in zip(dests, torch.split(staging, [d.numel() for d in dests])):
                    dest.copy_(piece)
            finally:
                host_pool.release(staging)
            return
        if offset + total > self.size:
            raise OSError(errno.EIO, f"short file: need {offset + total} bytes, file has {self.size}")
        views = [memoryview(d.numpy()) for d in dests]
        done = 0
        while views:
            got = os.preadv(self._fd, views, offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"short read: {done} of {total} bytes at offset {offset}")
            done += got
            _advance(views, got)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
