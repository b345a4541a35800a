"""libgdscache_io.so (io_backends/native) on the CPU: batches of files written from host memory and published
(fsynced, renamed into place), each file failing on its own and leaving nothing behind. Its GPU path is tested in
tests/gpu/test_kvikio_gpu.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kvtestlib import run_threads

from io_backends import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.LIB_NAME} is not built (needs nvcc)")


def _bytes(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _rows(rows: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """Host rows ``(file, offset, source)``."""
    return np.array([(file, -1, offset, src.size, src.ctypes.data) for file, offset, src in rows], dtype=native.WRANGE)


def _pairs(tmp_path, names: list[str]) -> list[tuple[str, str]]:
    return [(str(tmp_path / f".{name}.tmp"), str(tmp_path / name)) for name in names]


@pytest.mark.parametrize("durable", [True, False])
def test_every_file_lands_whole_and_is_renamed(tmp_path, durable):
    """Several ranges per file, given out of order and across files, with gaps (left as zeros) between them."""
    headers = [_bytes(4096, i) for i in range(3)]
    payloads = [_bytes(n, 10 + i) for i, n in enumerate([1, 70_000, 3 * 4096 + 17])]
    rows = [(i, 4096, payloads[i]) for i in range(3)] + [(i, 0, headers[i]) for i in (2, 0, 1)]
    rows.append((1, 4096 + 70_000 + 5000, headers[0][:10]))  # past a gap
    files = _pairs(tmp_path, ["a.gdc", "b.gdc", "c.gdc"])
    assert native.write(files, _rows(rows), threads=3, piece_bytes=4096, durable=durable, direct=True) == [0, 0, 0]
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "b.gdc", "c.gdc"]  # no temporaries left
    for i, (_, path) in enumerate(files):
        data = Path(path).read_bytes()
        assert data[:4096] == headers[i].tobytes()
        assert data[4096 : 4096 + payloads[i].size] == payloads[i].tobytes()
    tail = Path(files[1][1]).read_bytes()[4096 + 70_000 :]
    assert tail == bytes(5000) + headers[0][:10].tobytes()


def test_each_file_fails_on_its_own_and_leaves_nothing(tmp_path):
    (tmp_path / "taken.tmp").write_bytes(b"someone else's")  # the temporary name must be new: left alone
    (tmp_path / "dir.gdc").mkdir()  # a rename over a directory fails after the file was written
    files = [(str(tmp_path / "x.tmp"), str(tmp_path / "good.gdc")),
             (str(tmp_path / "no-such-dir" / "y.tmp"), str(tmp_path / "y.gdc")),
             (str(tmp_path / "taken.tmp"), str(tmp_path / "taken.gdc")),
             (str(tmp_path / "z.tmp"), str(tmp_path / "dir.gdc"))]
    data = _bytes(10_000, 1)
    results = native.write(files, _rows([(i, 0, data) for i in range(4)]), threads=2, piece_bytes=4096, durable=True,
                           direct=False)
    assert results[0] == 0
    assert native.error_of(results[1], "write").errno == errno.ENOENT
    assert native.error_of(results[2], "write").errno == errno.EEXIST
    assert native.error_of(results[3], "write").errno == errno.EISDIR
    assert sorted(os.listdir(tmp_path)) == ["dir.gdc", "good.gdc", "taken.tmp"]
    assert (tmp_path / "taken.tmp").read_bytes() == b"someone else's"
    assert os.listdir(tmp_path / "dir.gdc") == []
    assert (tmp_path / "good.gdc").read_bytes() == data.tobytes()


_TOO_BIG = """
import numpy as np, resource, signal, sys
from io_backends import native
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
small, big = np.ones(50_000, np.uint8), np.ones(200_000, np.uint8)
rows = np.array([(0, -1, 0, small.size, small.ctypes.data), (1, -1, 0, big.size, big.ctypes.data)],
                dtype=native.WRANGE)
d = sys.argv[1]
print(*native.write([(d + "/a.tmp", d + "/a.gdc"), (d + "/b.tmp", d + "/b.gdc")], rows, threads=2, piece_bytes=4096,
                    durable=True, direct=False))
"""


def test_a_write_that_fails_midway_unlinks_its_file(tmp_path):
    """A file whose write fails partway (here: past the process's file-size limit, as ENOSPC would) reports the
    errno and its temporary file is removed; the other file of the batch is published."""
    done = subprocess.run([sys.executable, "-c", _TOO_BIG, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [int(r) for r in done.stdout.split()] == [0, -errno.EFBIG]
    assert os.listdir(tmp_path) == ["a.gdc"]
    assert (tmp_path / "a.gdc").read_bytes() == bytes([1]) * 50_000


def test_bad_arguments_create_nothing(tmp_path):
    src = _bytes(10, 2)
    files = _pairs(tmp_path, ["a.gdc"])
    with pytest.raises(ValueError, match="refused"):
        native.write(files, _rows([(1, 0, src)]), threads=1, piece_bytes=4096, durable=True, direct=False)
    with pytest.raises(ValueError, match="multiple of 4096"):
        native.write(files, _rows([(0, 0, src)]), threads=1, piece_bytes=1000, durable=True, direct=False)
    with pytest.raises(ValueError, match="refused"):
        native.write(files, _rows([(0, -5, src)]), threads=1, piece_bytes=4096, durable=True, direct=False)
    with pytest.raises(TypeError, match="WRANGE"):
        native.write(files, np.zeros(3, dtype=np.int64), threads=1, piece_bytes=4096, durable=True, direct=False)
    with pytest.raises(ValueError, match="NUL"):  # the library would have written "a" instead
        native.write([(str(tmp_path / "a\0.tmp"), str(tmp_path / "a\0b"))], _rows([(0, 0, src)]), threads=1,
                     piece_bytes=4096, durable=True, direct=False)
    assert os.listdir(tmp_path) == []
    assert native.write([], np.zeros(0, dtype=native.WRANGE), threads=1, piece_bytes=4096, durable=True,
                        direct=False) == []
    # a file without ranges is published empty
    assert native.write(files, np.zeros(0, dtype=native.WRANGE), threads=1, piece_bytes=4096, durable=False,
                        direct=False) == [0]
    assert (tmp_path / "a.gdc").read_bytes() == b""


def test_writes_and_reads_from_many_threads_share_the_pool(tmp_path):
    """Threads writing batches and reading them back at once, on one pool: every byte where it belongs."""
    failures: list[str] = []

    def worker(k: int) -> None:
        for round_ in range(15):
            sources = [_bytes(30_000 + 4096 * i, 100 * k + round_ + i) for i in range(3)]
            files = _pairs(tmp_path, [f"{k}-{round_}-{i}.gdc" for i in range(3)])
            results = native.write(files, _rows([(i, 0, s) for i, s in enumerate(sources)]), threads=4,
                                   piece_bytes=8192, durable=round_ % 2 == 0, direct=False)
            if results != [0, 0, 0]:
                failures.append(f"write {results}")
                continue
            fds = [os.open(path, os.O_RDONLY) for _, path in files]
            dests = [np.zeros_like(s) for s in sources]
            rows = np.array([(fd, -1, 0, d.size, d.ctypes.data, 0) for fd, d in zip(fds, dests)], dtype=native.RANGE)
            try:
                if native.read(rows, threads=4, piece_bytes=8192).tolist() != [s.size for s in sources]:
                    failures.append("read result")
            finally:
                for fd in fds:
                    os.close(fd)
            if any(d.tobytes() != s.tobytes() for d, s in zip(dests, sources)):
                failures.append("bytes")

    run_threads(worker, 4)
    assert failures == []
    assert len(os.listdir(tmp_path)) == 4 * 15 * 3


def test_ranges_given_at_finish_land_after_the_first(tmp_path):
    """begin_write returns at once; finish adds ranges (here each file's header, overwriting what the first ranges
    left there) once the first have landed, then publishes."""
    payloads = [_bytes(20_000 + i, 30 + i) for i in range(3)]
    early = _bytes(4096, 40)  # written first at offset 0, then replaced by the header
    files = _pairs(tmp_path, ["a.gdc", "b.gdc", "c.gdc"])
    writing = native.begin_write(files, _rows([(i, 4096, p) for i, p in enumerate(payloads)] + [(1, 0, early)]),
                                 threads=2, piece_bytes=4096, durable=True, direct=False)
    headers = [_bytes(4096, 50 + i) for i in range(3)]
    assert writing.finish(_rows([(i, 0, h) for i, h in enumerate(headers)])) == [0, 0, 0]
    for (_, path), header, payload in zip(files, headers, payloads):
        assert Path(path).read_bytes() == header.tobytes() + payload.tobytes()
    with pytest.raises(RuntimeError, match="already finished"):
        writing.finish()


def test_a_read_does_not_wait_for_the_files_a_store_has_queued(tmp_path):
    """One worker, 40 files of a store queued: a read begun meanwhile runs after the file being written, not after
    all 40 (phase-1 jobs wait behind reads). Which files the worker had begun shows under their temporary names."""
    piece = 4096 * 37  # a pool of its own: exactly one worker
    source = tmp_path / "source"
    source.mkdir()
    data = _bytes(8192, 5)
    (source / "chunk").write_bytes(data.tobytes())
    fd = os.open(source / "chunk", os.O_RDONLY)
    out = tmp_path / "store"
    out.mkdir()
    src = _bytes(4 << 20, 6)
    files = _pairs(out, [f"f{i}.gdc" for i in range(40)])
    try:
        writing = native.begin_write(files, _rows([(i, 0, src) for i in range(40)]), threads=1, piece_bytes=piece,
                                     durable=False, direct=False)
        dest = np.zeros(8192, np.uint8)
        rows = np.array([(fd, -1, 0, dest.size, dest.ctypes.data, 0)], dtype=native.RANGE)
        assert native.read(rows, threads=1, piece_bytes=piece).tolist() == [8192]
        begun = len(os.listdir(out))
        assert writing.finish() == [0] * 40
    finally:
        os.close(fd)
    assert dest.tobytes() == data.tobytes()
    assert begun < 20, f"the read waited for {begun} of the store's 40 files"
    assert sorted(os.listdir(out)) == sorted(Path(path).name for _, path in files)


def test_an_abandoned_batch_leaves_nothing(tmp_path, caplog):
    files = _pairs(tmp_path, ["a.gdc", "b.gdc"])
    src = _bytes(50_000, 3)
    native.begin_write(files, _rows([(0, 0, src), (1, 0, src)]), threads=2, piece_bytes=4096, durable=True,
                       direct=False).abandon()
    assert os.listdir(tmp_path) == []
    writing = native.begin_write(files, _rows([(0, 0, src)]), threads=2, piece_bytes=4096, durable=True, direct=False)
    with pytest.raises(ValueError, match="every file of the batch was removed"):
        writing.finish(_rows([(5, 0, src)]))  # no file 5
    assert os.listdir(tmp_path) == []
    native.begin_write(files, _rows([(0, 0, src)]), threads=2, piece_bytes=4096, durable=True, direct=False)
    assert os.listdir(tmp_path) == []  # dropped unfinished: removed, with a warning
    assert "dropped unfinished" in caplog.text


def test_a_batch_begun_before_fork_is_the_parents(tmp_path):
    """A forked child that ends an inherited batch only lets go of it (without waiting for workers it does not
    have); the parent finishes and publishes it."""
    files = _pairs(tmp_path, ["a.gdc"])
    src = _bytes(1 << 20, 4)
    writing = native.begin_write(files, _rows([(0, 0, src)]), threads=2, piece_bytes=4096, durable=True, direct=False)
    pid = os.fork()
    if pid == 0:  # the child
        signal.alarm(10)  # a hang fails the test instead of blocking it
        code = 0
        try:
            code = 0 if writing.finish() == [-errno.ECANCELED] else 1
        except BaseException:  # noqa: BLE001 - the forked child must exit whatever happens
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert writing.finish() == [0]
    assert Path(files[0][1]).read_bytes() == src.tobytes()
