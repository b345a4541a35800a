"""FileBackend.read_files: whole files read at once, heads to host memory and bodies to one buffer, each file a
success or a failure of its own; the same answers from the default (POSIX, file by file) and from
libgdscache_io.so's workers (kvikio_backend.NativeFilesRead, here into host memory; on a GPU in
tests/gpu/test_kvikio_gpu.py)."""

from __future__ import annotations

import errno
import gc
import itertools
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch

from io_backends import PosixBackend, native
from io_backends.base import ALIGN, FilesRead, body_layout
from io_backends.kvikio_backend import NativeFilesRead

HEAD = 64
Reader = Callable[..., FilesRead]


def _posix(paths, head, device, *, max_body, touch=False):
    backend = PosixBackend(threads=2, o_direct="off")
    try:
        return backend.read_files(paths, head, device, max_body=max_body, touch=touch)
    finally:
        backend.close()


def _native(paths, head, device, *, max_body, touch=False):
    return NativeFilesRead(paths, head, device, max_body=max_body, touch=touch, threads=3, piece_bytes=4096)()


READERS = [pytest.param(_posix, id="posix"),
           pytest.param(_native, id="native", marks=pytest.mark.skipif(not native.available(),
                                                                      reason=f"{native.LIB_NAME} is not built"))]


def _write(tmp_path, name: str, nbytes: int, seed: int) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize("read", READERS)
def test_each_file_lands_whole_or_fails_on_its_own(tmp_path, read: Reader):
    sizes = [HEAD, HEAD + 1, HEAD + 4096, HEAD + 3 * 4096 + 17, HEAD + 70_000]
    files = [_write(tmp_path, f"f{i}", n, i) for i, n in enumerate(sizes)]
    short, _ = _write(tmp_path, "short", HEAD - 1, 9)
    big, big_data = _write(tmp_path, "big", HEAD + 100_000, 10)
    paths = [p for p, _ in files] + [short, str(tmp_path / "absent"), big, str(tmp_path)]
    got = read(paths, HEAD, torch.device("cpu"), max_body=80_000)
    assert got.sizes == sizes + [HEAD - 1, -1, len(big_data), got.sizes[-1]]
    for i, (_, data) in enumerate(files):
        assert got.errors[i] is None
        assert got.heads[i].tobytes() == data[:HEAD]
        assert got.bodies[i].numpy().tobytes() == data[HEAD:]
        if i:  # one buffer, bodies 4 KiB apart
            assert (got.bodies[i].data_ptr() - got.bodies[1].data_ptr()) % ALIGN == 0
    short_error, absent_error, big_error, dir_error = got.errors[len(files) :]
    assert isinstance(short_error, OSError) and short_error.errno == errno.EIO  # ends inside its head
    assert isinstance(absent_error, FileNotFoundError)
    assert big_error.errno == errno.EFBIG and got.bodies[len(files) + 2].numel() == 0  # not read, its size told
    assert isinstance(dir_error, OSError)  # a directory opens, but it reads as an error


@pytest.mark.parametrize("read", READERS)
def test_touch_sets_the_times_of_files_read_whole_only(tmp_path, read: Reader):
    good, _ = _write(tmp_path, "good", HEAD + 10, 1)
    short, _ = _write(tmp_path, "short", HEAD - 1, 2)
    for path in (good, short):
        os.utime(path, (1_000_000, 1_000_000))
    got = read([good, short], HEAD, torch.device("cpu"), max_body=1 << 20, touch=True)
    assert got.errors[0] is None and got.errors[1] is not None
    assert os.stat(good).st_mtime > 1_000_000 and os.stat(short).st_mtime == 1_000_000
    read([good], HEAD, torch.device("cpu"), max_body=1 << 20)
    os.utime(good, (1_000_000, 1_000_000))
    read([good], HEAD, torch.device("cpu"), max_body=1 << 20)  # touch=False leaves the times alone
    assert os.stat(good).st_mtime == 1_000_000


@pytest.mark.parametrize("read", READERS)
def test_no_file_is_left_open(tmp_path, read: Reader):
    paths = [_write(tmp_path, f"f{i}", HEAD + 5000, i)[0] for i in range(20)] + [str(tmp_path / "absent")]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        read(paths, HEAD, torch.device("cpu"), max_body=1 << 20)
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_empty_batch_reads_nothing(tmp_path):
    for read in (_posix, _native) if native.available() else (_posix,):
        got = read([], HEAD, torch.device("cpu"), max_body=1 << 20)
        assert got.sizes == [] and got.errors == [] and got.bodies == [] and got.heads.shape == (0, HEAD)


def test_body_layout_pads_each_body_to_4_kib_and_leaves_out_what_is_not_read():
    sizes = np.array([HEAD + 1, -2, HEAD - 5, HEAD + 4096, HEAD + 10_000, HEAD + 4097], dtype=np.int64)
    lengths, offsets, total, too_big = body_layout(sizes, HEAD, max_body=10_000)
    assert lengths.tolist() == [1, 0, 0, 4096, 0, 4097]
    assert too_big.tolist() == [False, False, False, False, True, False]
    assert offsets.tolist() == [0, 4096, 4096, 4096, 8192, 8192]
    assert total == 8192 + 8192
    lengths, offsets, total, too_big = body_layout(np.full(3, HEAD + 5000, dtype=np.int64), HEAD, max_body=10_000)
    assert lengths.tolist() == [5000] * 3 and offsets.tolist() == [0, 8192, 16384] and total == 3 * 8192
    assert too_big.tolist() == [False] * 3


native_only = pytest.mark.skipif(not native.available(), reason=f"{native.LIB_NAME} is not built")


@native_only
def test_files_read_by_the_sizes_the_caller_knows(tmp_path):
    """With sizes given, the library's workers open the files: one as large as told, one smaller (read whole, its
    body as long as the file's), one grown past its size (not read: ESTALE), one gone (FileNotFoundError)."""
    exact, exact_data = _write(tmp_path, "exact", HEAD + 5000, 1)
    smaller, smaller_data = _write(tmp_path, "smaller", HEAD + 3000, 2)
    grown, _ = _write(tmp_path, "grown", HEAD + 9000, 3)
    paths = [exact, smaller, grown, str(tmp_path / "gone")]
    got = NativeFilesRead(paths, HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                          piece_bytes=4096, sizes=[HEAD + 5000, HEAD + 4096, HEAD + 8192, HEAD + 100])()
    assert got.errors[:2] == [None, None] and got.sizes == [HEAD + 5000, HEAD + 3000, HEAD + 9000, -1]
    assert got.bodies[0].numpy().tobytes() == exact_data[HEAD:]
    assert got.bodies[1].numpy().tobytes() == smaller_data[HEAD:] and got.heads[1].tobytes() == smaller_data[:HEAD]
    assert got.errors[2].errno == errno.ESTALE and isinstance(got.errors[3], FileNotFoundError)
    with pytest.raises(ValueError, match="NUL"):
        NativeFilesRead(["a\0b"], HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                        piece_bytes=4096, sizes=[HEAD + 1])


@native_only
@pytest.mark.parametrize("length", [8192, 5000])
def test_files_of_one_size_land_as_rows_of_one_buffer(tmp_path, length):
    """Files all told one size are laid out 4 KiB-aligned rows apart and come back as :class:`Rows` of one view;
    one that turns out smaller, grown or gone is told apart as with mixed sizes."""
    from io_backends.base import Rows

    files = [_write(tmp_path, f"f{i}", HEAD + length, 10 + i) for i in range(4)]
    paths = [path for path, _ in files]
    got = NativeFilesRead(paths, HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                          piece_bytes=4096, sizes=[HEAD + length] * 4)()
    assert isinstance(got.bodies, Rows) and tuple(got.bodies.stack.shape) == (4, length)
    assert got.bodies.stack.stride(0) == 8192 and got.errors == [None] * 4 and got.sizes == [HEAD + length] * 4
    for (_, data), head, body in zip(files, got.heads, got.bodies, strict=True):
        assert head.tobytes() == data[:HEAD] and body.numpy().tobytes() == data[HEAD:]
    smaller, smaller_data = _write(tmp_path, "smaller", HEAD + 3000, 20)
    grown, _ = _write(tmp_path, "grown", HEAD + length + 1, 21)
    got = NativeFilesRead([paths[0], smaller, grown, str(tmp_path / "gone")], HEAD, torch.device("cpu"),
                          max_body=1 << 20, touch=False, threads=2, piece_bytes=4096, sizes=[HEAD + length] * 4)()
    assert got.errors[:2] == [None, None] and got.sizes == [HEAD + length, HEAD + 3000, HEAD + length + 1, -1]
    assert got.bodies[0].numpy().tobytes() == files[0][1][HEAD:]
    assert got.bodies[1].numpy().tobytes() == smaller_data[HEAD:]
    assert got.errors[2].errno == errno.ESTALE and isinstance(got.errors[3], FileNotFoundError)


@native_only
def test_batches_started_together_each_land_whole(tmp_path):
    files = [_write(tmp_path, f"f{i}", HEAD + 9000 + i, i) for i in range(10)]
    paths = [p for p, _ in files]
    first = NativeFilesRead(paths[:6], HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                            piece_bytes=4096)
    second = NativeFilesRead(paths[6:], HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                             piece_bytes=4096)
    got = second().bodies + first().bodies
    assert [b.numpy().tobytes() for b in got] == [d[HEAD:] for _, d in files[6:] + files[:6]]
    with pytest.raises(RuntimeError, match="already finished"):
        first()


@native_only
def test_a_batch_dropped_uncalled_still_closes_its_files(tmp_path):
    paths = [_write(tmp_path, f"f{i}", HEAD + 5000, i)[0] for i in range(8)]
    before = len(os.listdir("/proc/self/fd"))
    reading = NativeFilesRead(paths, HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                              piece_bytes=4096)
    del reading  # its files may be open, read or closed by now: once collected, it has waited for them
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


@native_only
def test_a_forked_child_closes_none_of_a_batch_s_descriptors(tmp_path):
    """A batch begun before a fork is the parent's: in the child it ends ECANCELED and closes no descriptor (a number
    the parent's workers closed before the fork may name another file in the child by then)."""
    import multiprocessing
    import time

    paths = [_write(tmp_path, f"f{i}", HEAD + 5000, i)[0] for i in range(4)]
    reading = NativeFilesRead(paths, HEAD, torch.device("cpu"), max_body=1 << 20, touch=False, threads=2,
                              piece_bytes=4096)
    time.sleep(0.5)  # the workers have opened, read and closed every file by now
    other = os.open(paths[0], os.O_RDONLY)  # most likely a number the workers used
    try:
        child = multiprocessing.get_context("fork").Process(target=_finish_in_child, args=(reading, other))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert reading().errors == [None] * 4
    finally:
        os.close(other)


def _finish_in_child(reading: NativeFilesRead, fd: int) -> None:
    got = reading()
    assert all(isinstance(e, OSError) and e.errno == errno.ECANCELED for e in got.errors), got.errors
    os.fstat(fd)  # still open


@native_only
def test_reads_in_flight_finish_once():
    dest = np.zeros(10, dtype=np.uint8)
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        rows = np.array([(fd, -1, 0, 10, dest.ctypes.data, 0)], dtype=native.RANGE)
        reads = native.begin_read(rows, threads=1, piece_bytes=4096)
        assert reads.finish()["result"].tolist() == [10] and dest[:4].tobytes() == b"\x7fELF"
        with pytest.raises(RuntimeError, match="already finished"):
            reads.finish()
        assert native.begin_read(rows[:0], threads=1, piece_bytes=4096).finish()["result"].tolist() == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("read", READERS)
def test_bodies_of_one_length_come_as_evenly_spaced_slices(tmp_path, read: Reader):
    files = [_write(tmp_path, f"f{i}", HEAD + 5000, i) for i in range(5)]
    got = read([p for p, _ in files], HEAD, torch.device("cpu"), max_body=1 << 20)
    assert [b.numpy().tobytes() for b in got.bodies] == [d[HEAD:] for _, d in files]
    starts = [b.data_ptr() for b in got.bodies]
    assert {b - a for a, b in itertools.pairwise(starts)} == {8192}  # 5000 bytes, each 4 KiB-padded
