"""libgdscache_io.so (io_backends/native) on the CPU: batched reads of open files into host memory, split into
pieces, failing range by range. Its GPU path is tested in tests/gpu/test_kvikio_gpu.py."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from kvtestlib import run_threads

from io_backends import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.LIB_NAME} is not built (needs nvcc)")


def _file(tmp_path, name: str, nbytes: int, seed: int) -> tuple[int, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd, data


def _ranges(rows: list[tuple[int, int, int, np.ndarray]]) -> np.ndarray:
    """Host rows ``(fd, offset, nbytes, dest)``."""
    return np.array([(fd, -1, offset, nbytes, dest.ctypes.data, 0) for fd, offset, nbytes, dest in rows],
                    dtype=native.RANGE)


def test_ranges_of_many_files_land_whole_across_pieces(tmp_path):
    sizes = [1, 4095, 4096, 4097, 3 * 4096 + 17, 70_000]
    files = [_file(tmp_path, f"f{i}", n + 100, i) for i, n in enumerate(sizes)]
    dests = [np.zeros(n, dtype=np.uint8) for n in sizes]
    try:
        results = native.read(_ranges([(fd, 50, n, d) for (fd, _), n, d in zip(files, sizes, dests)]),
                              threads=3, piece_bytes=4096)
        assert results.tolist() == sizes
        for (_, data), n, dest in zip(files, sizes, dests):
            assert dest.tobytes() == data[50 : 50 + n]
    finally:
        for fd, _ in files:
            os.close(fd)


def test_each_range_fails_on_its_own(tmp_path):
    fd, data = _file(tmp_path, "f", 10_000, 1)
    good, short, empty = np.zeros(5000, np.uint8), np.zeros(8000, np.uint8), np.zeros(1, np.uint8)
    bad_fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread refuses it
    try:
        results = native.read(_ranges([(fd, 0, 5000, good), (fd, 4000, 8000, short), (bad_fd, 0, 1, empty),
                                       (fd, 0, 0, empty)]), threads=2, piece_bytes=4096).tolist()
    finally:
        os.close(fd)
        os.close(bad_fd)
    assert results[0] == 5000 and good.tobytes() == data[:5000]
    assert results[3] == 0
    short_error = native.error_of(results[1], "read of f")
    assert short_error is not None and short_error.errno == errno.EIO and "file ends before the range" in str(short_error)
    dir_error = native.error_of(results[2], "read of a directory")
    assert dir_error is not None and dir_error.errno == errno.EISDIR
    assert native.error_of(results[0], "read") is None


def test_closed_descriptor_is_ebadf(tmp_path):
    fd, _ = _file(tmp_path, "f", 100, 2)
    os.close(fd)
    result = native.read(_ranges([(fd, 0, 10, np.zeros(10, np.uint8))]), threads=1, piece_bytes=4096)[0]
    assert native.error_of(int(result), "read").errno == errno.EBADF


_NO_THREAD = """
import numpy as np, os, resource, sys
from io_backends import native
fd = os.open(sys.argv[1], os.O_RDONLY)
dest = np.zeros(10, np.uint8)
rows = np.array([(fd, -1, 0, 10, dest.ctypes.data, 0)], dtype=native.RANGE)
native.available()
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 20), resource.RLIM_INFINITY))  # no room for a thread's stack
try:
    native.read(rows, threads=2, piece_bytes=4096)
except OSError as exc:
    print("OSError", exc.errno)
else:
    print("read")
"""


def test_a_pool_that_cannot_start_a_thread_is_an_os_error(tmp_path):
    """Where no worker thread can start (here: no address space left for its stack), the call raises OSError and
    reads nothing, instead of aborting the process."""
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    done = subprocess.run([sys.executable, "-c", _NO_THREAD, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OSError", str(errno.EAGAIN)]


def test_bad_arguments_are_refused_before_any_read(tmp_path):
    fd, _ = _file(tmp_path, "f", 100, 3)
    dest = np.zeros(10, np.uint8)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            native.read(_ranges([(fd, 0, 10, dest)]), threads=1, piece_bytes=1000)
        with pytest.raises(ValueError, match="refused"):
            native.read(_ranges([(fd, 0, -1, dest)]), threads=1, piece_bytes=4096)
        with pytest.raises(ValueError, match="refused"):
            native.read(_ranges([(fd, 0, 10, dest)]), threads=0, piece_bytes=4096)
        with pytest.raises(TypeError, match="RANGE"):
            native.read(np.zeros(3, dtype=np.int64), threads=1, piece_bytes=4096)
    finally:
        os.close(fd)
    assert native.read(np.zeros(0, dtype=native.RANGE), threads=1, piece_bytes=4096).size == 0


def test_batches_from_many_threads_share_the_pool(tmp_path):
    files = [_file(tmp_path, f"f{i}", 50_000, 10 + i) for i in range(4)]
    failures: list[str] = []

    def reader(k: int) -> None:
        for _ in range(30):
            dests = [np.zeros(50_000, np.uint8) for _ in files]
            rows = [(fd, 0, 50_000, d) for (fd, _), d in zip(files[k:] + files[:k], dests)]
            if native.read(_ranges(rows), threads=4, piece_bytes=8192).tolist() != [50_000] * 4:
                failures.append("result")
            if [d.tobytes() for d in dests] != [data for _, data in files[k:] + files[:k]]:
                failures.append("bytes")

    run_threads(reader, 4)
    for fd, _ in files:
        os.close(fd)
    assert failures == []


def _child_reads(fd: int, data: bytes) -> None:
    dest = np.zeros(len(data), np.uint8)
    result = native.read(_ranges([(fd, 0, len(data), dest)]), threads=2, piece_bytes=4096)[0]
    os._exit(0 if result == len(data) and dest.tobytes() == data else 1)


def test_a_forked_child_gets_its_own_workers(tmp_path):
    """The parent's worker threads do not exist in a forked child: its first batch starts a new pool."""
    import multiprocessing

    fd, data = _file(tmp_path, "f", 20_000, 5)
    try:
        assert native.read(_ranges([(fd, 0, 100, np.zeros(100, np.uint8))]), threads=2, piece_bytes=4096)[0] == 100
        child = multiprocessing.get_context("fork").Process(target=_child_reads, args=(fd, data))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    finally:
        os.close(fd)


def test_a_library_file_without_the_expected_symbols_is_skipped(tmp_path, caplog):
    """A stale or foreign build at a candidate path is passed over with a warning, not raised from the first call."""
    folder = tmp_path / "pkg" / "mod"
    folder.mkdir(parents=True)
    shutil.copy(native._library.get()._name, folder / "libother.so")

    def bind(lib) -> None:
        lib.gdc_no_such_symbol  # noqa: B018 - looked up as a binding would: AttributeError

    library = native.SharedLibrary("libother.so", folder, "GDSCACHE_TEST_LIB", "GDSCACHE_TEST_OFF", bind,
                                   tmp_path / "no-source.cu")
    with caplog.at_level("WARNING", logger="gdscache"):
        assert library.get() is None
    assert "is not used" in caplog.text and "gdc_no_such_symbol" in caplog.text


@pytest.mark.parametrize("case", ["same source", "source edited", "source edited, named"])
def test_a_build_from_other_source_is_used_only_when_named(tmp_path, caplog, monkeypatch, case):
    """The library reports the SHA-256 of the batch_io.cu it was built from: found beside the bindings (a stale
    editable install) it is passed over unless that is this checkout's file; named by the variable, it is used with
    a warning (to compare two builds)."""
    if os.environ.get("GDSCACHE_IO_LIB"):
        pytest.skip("$GDSCACHE_IO_LIB names the library: it need not be built from this checkout's batch_io.cu")
    folder = tmp_path / "pkg" / "mod"
    folder.mkdir(parents=True)
    shutil.copy(native._library.get()._name, folder / native.LIB_NAME)
    source = tmp_path / "batch_io.cu"
    source.write_bytes(native._library._source.read_bytes() + (b"" if case == "same source" else b"// edited\n"))
    if case.endswith("named"):
        monkeypatch.setenv("GDSCACHE_TEST_LIB", str(folder / native.LIB_NAME))
    library = native.SharedLibrary(native.LIB_NAME, folder, "GDSCACHE_TEST_LIB", "GDSCACHE_TEST_OFF", native._bind,
                                   source)
    with caplog.at_level("WARNING", logger="gdscache"):
        lib = library.get()
    if case == "source edited":
        assert lib is None
        assert "is not used" in caplog.text and "a stale build" in caplog.text
    else:
        assert lib is not None
        assert ("used because $GDSCACHE_TEST_LIB names it" in caplog.text) == case.endswith("named")
