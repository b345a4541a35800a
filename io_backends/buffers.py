"""Page-aligned host buffers, for O_DIRECT and GPUDirect Storage."""

from __future__ import annotations

import threading

import torch

from io_backends.base import ALIGN, ForkSafeLock, align_up


def cuda_usable() -> bool:
    """True when a CUDA driver and device are present (pinned memory needs one)."""
    return torch.cuda.is_available()


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised 1-D uint8 host tensor of ``nbytes`` whose address is a multiple of ``ALIGN``.

    ``pin`` asks for page-locked memory and is ignored where CUDA is absent. The tensor is an ordinary one on the
    host whatever the calling thread's torch modes (``inference_mode``, a default device): buffers are pooled and
    reused by other threads, which could not write into an inference tensor.
    """
    with torch.inference_mode(False):
        if pin and cuda_usable():
            return torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cpu", pin_memory=True)[:nbytes]
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device="cpu")
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + nbytes]


def is_aligned(buf: torch.Tensor) -> bool:
    return buf.data_ptr() % ALIGN == 0


class BounceBuffers:
    """One reusable aligned host buffer per thread, grown on demand."""

    def __init__(self, *, pin: bool = False) -> None:
        self._pin = pin
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf: torch.Tensor | None = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(align_up(max(nbytes, ALIGN)), pin=self._pin)
            self._local.buf = buf
        return buf[:nbytes]


class HostBufferPool:
    """Page-aligned host buffers, reused by size so that their pages are already mapped and touched.

    A fresh large buffer costs a page fault per 4 KiB on first touch, which on a VM can take as
    long as the disk read itself. ``acquire`` hands out a buffer; ``release`` gives back one that
    ``acquire`` returned and that nothing uses any more. A buffer never released is simply freed by
    the garbage collector. At most ``max_bytes`` of free buffers are kept.
    """

    def __init__(self, max_bytes: int = 512 << 20, *, pin: bool = False) -> None:
        self.max_bytes = max_bytes
        self._pin = pin
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0
        self._lock = ForkSafeLock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        size = align_up(max(nbytes, 1))
        with self._lock:
            stack = self._free.get(size)
            base = stack.pop() if stack else None
            if base is not None:
                self._free_bytes -= size
        if base is None:
            base = aligned_empty(size, pin=self._pin)
        return base[:nbytes]

    def release(self, buf: torch.Tensor) -> None:
        size = align_up(max(buf.numel(), 1))
        if buf.untyped_storage().nbytes() < buf.storage_offset() + size or not is_aligned(buf):
            return  # not one of ours
        base = torch.as_strided(buf, (size,), (1,), buf.storage_offset())
        with self._lock:
            if self._free_bytes + size > self.max_bytes:
                return
            self._free.setdefault(size, []).append(base)
            self._free_bytes += size


host_pool = HostBufferPool(pin=cuda_usable())
"""The process-wide pool used for chunk payloads in host memory."""
