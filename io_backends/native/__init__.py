"""ctypes binding to ``libgdscache_io.so`` (``batch_read.cu`` here): many reads of open files into host or GPU
memory in one call, on a pool of native threads, with the GIL released.

The library is looked up at ``$GDSCACHE_IO_LIB``, then next to this module (where ``pip install`` puts it when
nvcc exists), then in ``build/cuda`` of a source checkout. Without it, or with ``GDSCACHE_NO_NATIVE_IO=1``, :func:`available` is
False and the backends read file by file.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from io_backends.base import ForkSafeLock

log = logging.getLogger("gdscache")
LIB_NAME = "libgdscache_io.so"
RANGE = np.dtype([("fd", "<i4"), ("device", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("dst", "<u8"),
                  ("result", "<i8")])
"""One read: ``nbytes`` of open file ``fd`` from ``offset`` to address ``dst``, on CUDA ``device`` (-1: host
memory); ``result`` comes back as the bytes read or a negative error code (:func:`error_of`)."""
_SHORT_FILE = 99999
_CUDA_ERROR_BASE = 100000


class SharedLibrary:
    """A C-ABI library loaded by ctypes on first use, once per process: from ``$<path_variable>``, then ``name`` in
    ``folder`` (where ``pip install`` puts it), then in ``build/cuda`` of the source checkout above ``folder``; the
    first that loads and that ``bind`` accepts (it declares the signatures, raising ``AttributeError`` for a symbol
    the file lacks or ``ValueError`` for a file built from other sources). None without one, or with
    ``$<off_variable>=1``."""

    def __init__(self, name: str, folder: Path, path_variable: str, off_variable: str,
                 bind: Callable[[ctypes.CDLL], None]) -> None:
        self._candidates = (name, folder, path_variable)
        self._off_variable, self._bind = off_variable, bind
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = ForkSafeLock()  # I/O threads may make their first calls at once

    def get(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._lib = None if os.environ.get(self._off_variable) == "1" else self._open()
                    self._tried = True
        return self._lib

    def _open(self) -> ctypes.CDLL | None:
        name, folder, path_variable = self._candidates
        for path in (os.environ.get(path_variable), folder / name, folder.parents[1] / "build" / "cuda" / name):
            if not path or not Path(path).is_file():
                continue
            try:
                lib = ctypes.CDLL(str(path))
                self._bind(lib)
            except (OSError, AttributeError, ValueError) as exc:  # not loadable, a stale build, another library's
                log.warning("%s is not used: %s", path, exc)
                continue
            return lib
        return None


def _bind(lib: ctypes.CDLL) -> None:
    lib.gio_range_size.restype = ctypes.c_int
    if lib.gio_range_size() != RANGE.itemsize:
        raise ValueError("built from another version of batch_read.cu")
    lib.gio_read.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    lib.gio_read.restype = ctypes.c_int
    lib.gio_cuda_error_name.argtypes = [ctypes.c_int]
    lib.gio_cuda_error_name.restype = ctypes.c_char_p


_library = SharedLibrary(LIB_NAME, Path(__file__).resolve().parent, "GDSCACHE_IO_LIB", "GDSCACHE_NO_NATIVE_IO", _bind)


def available() -> bool:
    """True when the native library loads."""
    return _library.get() is not None


def read(ranges: np.ndarray, *, threads: int, piece_bytes: int) -> np.ndarray:
    """Read every row of ``ranges`` (a contiguous :data:`RANGE` array) and return its ``result`` column.

    GPU rows go through pinned staging in pieces of ``piece_bytes`` and have landed on the device when this
    returns. The destinations must stay valid and untouched until then. Raises ``ValueError`` for bad arguments and
    ``OSError`` where the library could start no worker or queue nothing (then nothing was read).
    """
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"{LIB_NAME} is not available")
    if ranges.dtype != RANGE or not ranges.flags.c_contiguous:
        raise TypeError("ranges must be a contiguous array of io_backends.native.RANGE")
    code = lib.gio_read(ranges.ctypes.data, len(ranges), threads, piece_bytes)
    if code in (-errno.EAGAIN, -errno.ENOMEM):
        raise OSError(-code, f"{LIB_NAME} could not " + ("start a worker thread" if code == -errno.EAGAIN
                                                          else "queue the batch"))
    if code != 0:
        raise ValueError(f"gio_read refused its arguments ({os.strerror(-code)}): threads={threads}, "
                         f"piece_bytes={piece_bytes} (a multiple of 4096), offsets and sizes >= 0, destinations set")
    return ranges["result"]


def error_of(result: int, what: str) -> OSError | None:
    """None for a row's ``result`` >= 0, else the ``OSError`` it stands for; ``what`` names the read."""
    if result >= 0:
        return None
    code = -result
    if code >= _CUDA_ERROR_BASE:
        lib = _library.get()
        name = lib.gio_cuda_error_name(code - _CUDA_ERROR_BASE).decode() if lib is not None else str(code)
        return OSError(errno.EIO, f"{what}: CUDA copy failed ({name})")
    if code == _SHORT_FILE:
        return OSError(errno.EIO, f"{what}: short read, the file ends before the range")
    return OSError(code, f"{what}: {os.strerror(code)}")
