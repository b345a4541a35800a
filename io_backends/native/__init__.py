"""ctypes binding to ``libgdscache_io.so`` (``batch_io.cu`` here), on native threads with the GIL released (reads
and writes on pools of their own): many reads of open files into host or GPU memory in one call (:func:`read`),
many files read whole (opened, read and closed by the workers: :func:`begin_read_files`), and many files written
from host or GPU memory and published (fsynced, renamed into place) in one call (:func:`write`).

The library is looked up at ``$GDSCACHE_IO_LIB``, then next to this module (where ``pip install`` puts it when
nvcc exists), then in ``build/cuda`` of a source checkout; a build from other source than this ``batch_io.cu`` is
passed over unless the variable names it (:class:`SharedLibrary`). Without it, or with ``GDSCACHE_NO_NATIVE_IO=1``,
:func:`available` is False and the backends read and write file by file.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from io_backends.base import ForkSafeLock

log = logging.getLogger("gdscache")
LIB_NAME = "libgdscache_io.so"
RANGE = np.dtype([("fd", "<i4"), ("device", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("dst", "<u8"),
                  ("result", "<i8")])
"""One read: ``nbytes`` of open file ``fd`` from ``offset`` to address ``dst``, on CUDA ``device`` (-1: host
memory); ``result`` comes back as the bytes read or a negative error code (:func:`error_of`)."""
WHOLE = np.dtype([("path", "<u8"), ("size", "<i8"), ("head", "<u8"), ("body", "<u8"), ("device", "<i4"),
                  ("touch", "<i4"), ("result", "<i8")])
"""One file to read whole (:func:`begin_read_files` fills ``path``) of at most ``size`` bytes: its head goes to host
address ``head``, the rest to ``body`` on CUDA ``device`` (-1: host memory); where ``touch``, its times are set to now
once it is read whole. ``result`` comes back 0 or a negative error code (:func:`error_of`), ``size`` as the size it
had (or the error that kept it from being opened)."""
FILE = np.dtype([("tmp", "<u8"), ("path", "<u8"), ("result", "<i8")])
"""One file to publish (:func:`write` fills it from paths): written at ``tmp``, renamed to ``path``."""
WRANGE = np.dtype([("file", "<i4"), ("device", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("src", "<u8")])
"""One write: ``nbytes`` from address ``src`` (on CUDA ``device``, -1: host memory) to byte ``offset`` of the batch's
file number ``file``."""
_SHORT_FILE = 99999
_SIZE_CHANGED = 99998
_CUDA_ERROR_BASE = 100000


class SharedLibrary:
    """A C-ABI library loaded by ctypes on first use, once per process: from ``$<path_variable>``, then ``name`` in
    ``folder`` (where ``pip install`` puts it), then in ``build/cuda`` of the source checkout above ``folder``; the
    first that loads and that ``bind`` accepts (it declares the signatures, raising ``AttributeError`` for a symbol
    the file lacks or ``ValueError`` for a file built from other sources). None without one, or with
    ``$<off_variable>=1``.

    Where ``source`` (the file it is built from) exists, a library found beside ``folder`` or in ``build/cuda`` must
    have been built from that very file (its ``gdscache_source_sha256``, which CMake sets): a stale build is passed
    over with a warning. One that ``$<path_variable>`` names is used whatever it was built from (with a warning
    where that is other source), so that two builds can be compared."""

    def __init__(self, name: str, folder: Path, path_variable: str, off_variable: str,
                 bind: Callable[[ctypes.CDLL], None], source: Path) -> None:
        self._candidates = (name, folder, path_variable)
        self._off_variable, self._bind, self._source = off_variable, bind, source
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
        named = os.environ.get(path_variable)
        for path in (named, folder / name, folder.parents[1] / "build" / "cuda" / name):
            if not path or not Path(path).is_file():
                continue
            try:
                lib = ctypes.CDLL(str(path))
                self._bind(lib)
                self._check_source(lib, path, chosen=path == named)
            except (OSError, AttributeError, ValueError) as exc:  # not loadable, a stale build, another library's
                log.warning("%s is not used: %s", path, exc)
                continue
            return lib
        return None

    def _check_source(self, lib: ctypes.CDLL, path: str | Path, *, chosen: bool) -> None:
        """Raise ``ValueError`` for a library built from other source than ``source`` (unless ``chosen``: then warn)."""
        if not self._source.is_file():  # an install without the sources: nothing to compare with
            return
        want = hashlib.sha256(self._source.read_bytes()).hexdigest()
        report = getattr(lib, "gdscache_source_sha256", None)  # None: a build from before the digest was kept
        built_from = ""
        if report is not None:
            report.restype = ctypes.c_char_p
            built_from = (report() or b"").decode()
        if built_from == want:
            return
        what = f"built from another {self._source.name} than {self._source}" if built_from else \
            f"not known to be built from {self._source} (no digest of its source)"
        if not chosen:
            raise ValueError(f"{what}: a stale build; rebuild it (pip install -e . or cmake --build build/cuda)")
        log.warning("%s is %s; used because $%s names it", path, what, self._candidates[2])


def _bind(lib: ctypes.CDLL) -> None:
    for sizeof in (lib.gio_range_size, lib.gio_whole_size, lib.gio_file_size, lib.gio_wrange_size):
        sizeof.restype = ctypes.c_int
    if (lib.gio_range_size(), lib.gio_whole_size(), lib.gio_file_size(), lib.gio_wrange_size()) != \
            (RANGE.itemsize, WHOLE.itemsize, FILE.itemsize, WRANGE.itemsize):
        raise ValueError("built from another version of batch_io.cu")
    lib.gio_read_begin.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                   ctypes.POINTER(ctypes.c_int)]
    lib.gio_read_begin.restype = ctypes.c_void_p
    lib.gio_read_finish.argtypes = [ctypes.c_void_p]
    lib.gio_read_finish.restype = ctypes.c_int
    lib.gio_read_files_begin.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                                         ctypes.POINTER(ctypes.c_int)]
    lib.gio_read_files_begin.restype = ctypes.c_void_p
    lib.gio_write_begin.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.gio_write_begin.restype = ctypes.c_void_p
    lib.gio_write_finish.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.gio_write_finish.restype = ctypes.c_int
    lib.gio_cuda_error_name.argtypes = [ctypes.c_int]
    lib.gio_cuda_error_name.restype = ctypes.c_char_p


_library = SharedLibrary(LIB_NAME, Path(__file__).resolve().parent, "GDSCACHE_IO_LIB", "GDSCACHE_NO_NATIVE_IO", _bind,
                         Path(__file__).resolve().parent / "batch_io.cu")


def available() -> bool:
    """True when the native library loads."""
    return _library.get() is not None


def _lib() -> ctypes.CDLL:
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"{LIB_NAME} is not available")
    return lib


def _check(array: np.ndarray, dtype: np.dtype, name: str) -> None:
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise TypeError(f"{name} must be a contiguous array of io_backends.native.{name.upper()}")


def _refused(code: int, call: str, what: str) -> Exception:
    """The exception for a nonzero return ``code`` of ``call``."""
    if code in (-errno.EAGAIN, -errno.ENOMEM):
        return OSError(-code, f"{LIB_NAME} could not " + ("start a worker thread" if code == -errno.EAGAIN
                                                           else "queue the batch"))
    return ValueError(f"{call} refused its arguments ({os.strerror(-code)}): {what}")


def read(ranges: np.ndarray, *, threads: int, piece_bytes: int) -> np.ndarray:
    """Read every row of ``ranges`` (a contiguous :data:`RANGE` array) and return its ``result`` column.

    GPU rows go through pinned staging in pieces of ``piece_bytes`` and have landed on the device when this
    returns. The destinations must stay valid and untouched until then. Raises ``ValueError`` for bad arguments and
    ``OSError`` where the library could start no worker or queue nothing (then nothing was read).
    """
    return begin_read(ranges, threads=threads, piece_bytes=piece_bytes).finish()["result"]


class ReadsInFlight:
    """Reads started by :func:`begin_read` or :func:`begin_read_files`: :meth:`finish` waits for them, once (a batch
    dropped unfinished is waited for when collected: its destinations are in use until then)."""

    def __init__(self, rows: np.ndarray, begin: Callable[[ctypes.c_int], int | None], keep: object, refused: str
                 ) -> None:
        self._rows, self._keep = rows, keep  # alive until the batch has ended
        error = ctypes.c_int(0)
        self._batch = begin(error)
        if error.value != 0:
            raise _refused(error.value, refused, "threads >= 1, piece_bytes a multiple of 4096, sizes >= 0, "
                                                 "destinations set")

    def finish(self) -> np.ndarray:
        """Wait until every row has landed (or failed); the rows, their ``result`` (and a file's ``size``) set."""
        if self._rows is None:
            raise RuntimeError("these reads were already finished")
        batch, self._batch = self._batch, None
        if batch:
            _lib().gio_read_finish(batch)
        rows, self._rows, self._keep = self._rows, None, None
        return rows

    def __del__(self) -> None:
        if getattr(self, "_batch", None):
            self.finish()


def begin_read(ranges: np.ndarray, *, threads: int, piece_bytes: int, keep: object = None) -> ReadsInFlight:
    """Start :func:`read` of ``ranges`` and return at once; :meth:`ReadsInFlight.finish` waits for the rows and gives
    them back, results set. The rows and destinations must stay valid and untouched until then: ``keep`` (what owns
    the destinations) is held until then. Raises as :func:`read` does (then nothing was read)."""
    _check(ranges, RANGE, "range")
    return ReadsInFlight(ranges, lambda error: _lib().gio_read_begin(ranges.ctypes.data, len(ranges), threads,
                                                                     piece_bytes, ctypes.byref(error)),
                         keep, "gio_read_begin")


def begin_read_files(paths: Sequence[str], files: np.ndarray, head_bytes: int, *, threads: int, piece_bytes: int,
                     keep: object = None) -> ReadsInFlight:
    """Start reading each of ``paths`` whole as its row of ``files`` (a contiguous :data:`WHOLE` array; ``path`` is
    set here) says, on the library's workers: each file is opened, checked to have ``size`` bytes, its first
    ``head_bytes`` read to ``head`` and the rest to ``body``, and closed once read (a file larger than its ``size``
    is not read). Returns at once;
    :meth:`ReadsInFlight.finish` waits and gives the rows back, ``result`` and ``size`` set. The destinations must
    stay valid and untouched until then: ``keep`` is held until then. Raises ``ValueError`` for bad arguments (a
    negative size, a destination missing, a NUL in a path) and ``OSError`` where the library could start no worker or
    queue nothing (then nothing was read)."""
    _check(files, WHOLE, "whole")
    if len(paths) != len(files):
        raise ValueError(f"{len(paths)} paths for {len(files)} files")
    blob, files["path"] = _c_strings(paths)
    return ReadsInFlight(files, lambda error: _lib().gio_read_files_begin(files.ctypes.data, len(files), head_bytes,
                                                                          threads, piece_bytes, ctypes.byref(error)),
                         (blob, keep), "gio_read_files_begin")


def _c_strings(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``paths`` as NUL-terminated strings in one buffer (keep it alive while the library may read them), and the
    address of each. Raises ``ValueError`` for a path holding a NUL byte (the library would read a shorter one)."""
    blob = np.frombuffer(os.fsencode("\0".join(paths)) + b"\0", dtype=np.uint8)
    ends = np.flatnonzero(blob == 0)
    if len(ends) != max(len(paths), 1):
        raise ValueError("a path holds a NUL byte")
    starts = np.concatenate(([0], ends[:-1] + 1))[: len(paths)]
    return blob, starts.astype(np.uint64) + np.uint64(blob.ctypes.data)


class FilesInFlight:
    """Files being written by the library (:func:`begin_write`): :meth:`finish` adds the last ranges and publishes
    them, :meth:`abandon` removes them. One of the two must be called, once."""

    def __init__(self, files: Sequence[tuple[str, str]], ranges: np.ndarray, *, threads: int, piece_bytes: int,
                 durable: bool, direct: bool, keep: object = None) -> None:
        _check(ranges, WRANGE, "wrange")
        self._keep = keep  # what owns the sources: alive until the batch has ended, even if dropped unfinished
        self._table = np.zeros(len(files), dtype=FILE)
        self._blob, starts = _c_strings([name for pair in files for name in pair])  # alive until the batch ends, as
        self._ranges = ranges                                                           # are the ranges
        self._table["tmp"], self._table["path"] = starts[0::2], starts[1::2]
        error = ctypes.c_int(0)
        self._batch = _lib().gio_write_begin(self._table.ctypes.data, len(self._table), ranges.ctypes.data, len(ranges),
                                             threads, piece_bytes, int(durable), int(direct), ctypes.byref(error))
        if not self._batch:
            raise _refused(error.value, "gio_write_begin", f"threads={threads}, piece_bytes={piece_bytes} (a multiple "
                                        "of 4096), files indexed in range, offsets and sizes >= 0, sources set")

    def finish(self, ranges: np.ndarray | None = None) -> list[int]:
        """Write ``ranges`` (:data:`WRANGE` rows; their sources stay valid until this returns) once the first ranges
        are written, then publish each file: fsynced where durable, closed and renamed. Each file's result: 0, or a
        negative code (:func:`error_of`; its temporary file is then gone)."""
        if ranges is None:
            ranges = np.zeros(0, dtype=WRANGE)
        _check(ranges, WRANGE, "wrange")
        code = self._end(ranges, abandon=False)
        if code != 0:
            raise _refused(code, "gio_write_finish", "files indexed in range, offsets and sizes >= 0, sources set "
                                                     "(every file of the batch was removed)")
        return self._table["result"].tolist()

    def abandon(self) -> None:
        """Remove every file once its writes have ended (the sources may then be reused)."""
        self._end(np.zeros(0, dtype=WRANGE), abandon=True)

    def __del__(self) -> None:
        if getattr(self, "_batch", None):  # a caller that neither finished nor abandoned it: leave nothing behind
            log.warning("a batch of %d file(s) was dropped unfinished; its files are removed", len(self._table))
            self.abandon()

    def _end(self, ranges: np.ndarray, *, abandon: bool) -> int:
        if not self._batch:
            raise RuntimeError("this batch of files was already finished or abandoned")
        batch, self._batch = self._batch, None
        return _lib().gio_write_finish(batch, ranges.ctypes.data, len(ranges), int(abandon))


def begin_write(files: Sequence[tuple[str, str]], ranges: np.ndarray, *, threads: int, piece_bytes: int,
                durable: bool, direct: bool, keep: object = None) -> FilesInFlight:
    """Start writing every row of ``ranges`` (a contiguous :data:`WRANGE` array; ``file`` indexes ``files``) into
    ``files``, given as ``(temporary path, final path)``: each is created at the temporary path (which must not
    exist) and written. Returns at once; :meth:`FilesInFlight.finish` publishes them.

    GPU rows go through pinned staging in pieces of ``piece_bytes``, and through ``O_DIRECT`` where ``direct`` and
    aligned. The sources must stay valid and unchanged until the batch is finished or abandoned: ``keep`` (what owns
    them) is held until then. Raises
    ``ValueError`` for bad arguments and ``OSError`` where the library could start no worker or queue nothing (then
    no file was created).
    """
    return FilesInFlight(files, ranges, threads=threads, piece_bytes=piece_bytes, durable=durable, direct=direct,
                         keep=keep)


def write(files: Sequence[tuple[str, str]], ranges: np.ndarray, *, threads: int, piece_bytes: int, durable: bool,
          direct: bool) -> list[int]:
    """:func:`begin_write`, then :meth:`FilesInFlight.finish`: every file written and published (or failed) when
    this returns; each file's result as there."""
    return begin_write(files, ranges, threads=threads, piece_bytes=piece_bytes, durable=durable,
                       direct=direct).finish()


def error_of(result: int, what: str) -> OSError | None:
    """None for a ``result`` >= 0, else the ``OSError`` it stands for; ``what`` names the read or write."""
    if result >= 0:
        return None
    code = -result
    if code >= _CUDA_ERROR_BASE:
        lib = _library.get()
        name = lib.gio_cuda_error_name(code - _CUDA_ERROR_BASE).decode() if lib is not None else str(code)
        return OSError(errno.EIO, f"{what}: CUDA copy failed ({name})")
    if code == _SHORT_FILE:
        return OSError(errno.EIO, f"{what}: short read, the file ends before the range")
    if code == _SIZE_CHANGED:
        return OSError(errno.ESTALE, f"{what}: not read, the file has grown past the size it had")
    return OSError(code, f"{what}: {os.strerror(code)}")
