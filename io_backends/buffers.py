"""Page-aligned host buffers, for O_DIRECT and GPUDirect Storage."""

from __future__ import annotations

import threading

import torch

from io_backends.base import ALIGN, align_up


def cuda_usable() -> bool:
    """True when a CUDA driver and device are present (pinned memory needs one)."""
    return torch.cuda.is_available()


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised 1-D uint8 host tensor of ``nbytes`` whose address is a multiple of ``ALIGN``.

    ``pin`` asks for page-locked memory and is ignored where CUDA is absent.
    """
    if pin and cuda_usable():
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)[:nbytes]
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
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
