"""Byte movers: POSIX files, kvikio/cuFile files, fsspec objects. They know nothing about KV caches."""

from __future__ import annotations

import logging

from io_backends.base import ALIGN, FileBackend, ObjectStore, Part, ReadHandle, align_up
from io_backends.posix import PosixBackend

log = logging.getLogger("gdscache")
STORAGE = ("gds", "posix")
O_DIRECT = ("auto", "on", "off")


def gds_unavailable_reason() -> str | None:
    """Why kvikio cannot run here (no CUDA driver or device, kvikio missing or broken), or None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA driver or device"
    try:
        import kvikio  # noqa: F401
    except ImportError as exc:
        return f"kvikio is not importable ({exc}); install gdscache[cu13] or gdscache[cu12]"
    except OSError as exc:
        return f"kvikio's libraries failed to load ({exc})"
    return None


def make_file_backend(storage: str, threads: int = 8, o_direct: str = "auto", directory: str | None = None,
                      native: bool = True) -> FileBackend:
    """``posix``: POSIX always. ``gds``: kvikio/cuFile when a CUDA driver exists, else POSIX with a warning.
    ``directory``: where the files will be, for kvikio to check that cuFile can register files there. ``native``:
    kvikio's backend may batch reads and writes through ``libgdscache_io.so``; False leaves every byte to kvikio."""
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
    if o_direct not in O_DIRECT:
        raise ValueError(f"o_direct must be one of {O_DIRECT}, got {o_direct!r}")
    if storage == "gds":
        reason = gds_unavailable_reason()
        if reason is None:
            from io_backends.kvikio_backend import KvikioBackend

            return KvikioBackend(threads=threads, o_direct=o_direct, probe_dir=directory,  # type: ignore[arg-type]
                                 native=native)
        log.warning("storage 'gds' unavailable: %s; using the POSIX backend", reason)
    return PosixBackend(threads=threads, o_direct=o_direct)  # type: ignore[arg-type]


__all__ = [
    "ALIGN", "FileBackend", "ObjectStore", "Part", "PosixBackend", "ReadHandle", "align_up",
    "gds_unavailable_reason", "make_file_backend",
]
