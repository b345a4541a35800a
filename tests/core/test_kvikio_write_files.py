"""KvikioBackend.write_files' bookkeeping (each file published or failed alone, no temporary left behind).

kvikio can do no I/O without a CUDA driver, so here its ``CuFile`` is stood in by plain file I/O on host
tensors; the batched native path (libgdscache_io.so) runs for real on host tensors. tests/gpu runs both with the
real kvikio on a GPU.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from io_backends import native
from io_backends.base import Part
from io_backends.kvikio_backend import KvikioBackend, OpenFiles


class _Future:
    def __init__(self, result: int | Exception) -> None:
        self._result = result

    def get(self) -> int:
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


class _CuFile:
    """Writes synchronously; a file whose name contains ``fail-`` fails its tensor writes the way kvikio does."""

    def __init__(self, path: str, mode: str) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:  # what kvikio raises
            raise RuntimeError(f"Unable to open file. Linux system/library function call error: {exc.strerror}") from exc
        self._failing = "fail-" in path
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def pwrite(self, buf: object, nbytes: int, offset: int) -> _Future:
        if self._failing:
            return _Future(RuntimeError("Linux system/library function call error: No space left on device"))
        return _Future(os.pwrite(self._fd, memoryview(buf), offset))  # host buffers arrive as numpy arrays

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True


@pytest.fixture
def backend() -> KvikioBackend:
    fake = object.__new__(KvikioBackend)
    fake._kvikio = types.SimpleNamespace(CuFile=_CuFile)
    fake._open_files = OpenFiles(fake._open_handle, 0)
    fake.native_writes = False
    return fake


def _file(path: str, fill: int) -> tuple[str, list[Part]]:
    return path, [Part(0, bytes([fill]) * 4096), Part(4096, torch.full((5000,), fill, dtype=torch.uint8))]


@pytest.mark.parametrize("durable", [True, False])
def test_each_file_is_published_or_fails_alone(backend, tmp_path, durable):
    files = [_file(str(tmp_path / "a.gdc"), 1), _file(str(tmp_path / "fail-b.gdc"), 2),
             _file(str(tmp_path / "no-such-dir" / "c.gdc"), 3), _file(str(tmp_path / "d.gdc"), 4)]
    errors = backend.write_files(files, durable=durable)
    assert errors[0] is None and errors[3] is None
    assert isinstance(errors[1], OSError) and errors[1].errno == 28  # kvikio's ENOSPC text, as an OSError
    assert isinstance(errors[2], OSError)
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "d.gdc"]  # no temporaries, nothing of the failed files
    for name, fill in (("a.gdc", 1), ("d.gdc", 4)):
        assert (tmp_path / name).read_bytes() == bytes([fill]) * (4096 + 5000)


def test_write_file_raises_the_files_error(backend, tmp_path):
    with pytest.raises(OSError, match="No space left"):
        backend.write_file(*_file(str(tmp_path / "fail-x.gdc"), 7))
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="uint8"):  # a bad buffer is refused before any file is created
        backend.write_files([_file(str(tmp_path / "y.gdc"), 1), (str(tmp_path / "z.gdc"), [Part(0, torch.zeros(3))])])
    assert os.listdir(tmp_path) == []


def _use_native(backend: KvikioBackend) -> None:
    """Send the fake backend's batches through libgdscache_io.so (skipped where it is not built)."""
    if not native.available():
        pytest.skip(f"{native.LIB_NAME} is not built (needs nvcc)")
    backend.native_writes, backend._threads, backend._task_size, backend._direct_writes = True, 2, 4096, True


@pytest.mark.parametrize("durable", [True, False])
def test_native_writes_publish_each_file_alone(backend, tmp_path, durable):
    """With ``native_writes`` the batch is one call into the library: bytes and host tensors land whole, a file
    that cannot be created fails alone as an OSError, and no temporary is left."""
    _use_native(backend)
    files = [_file(str(tmp_path / "a.gdc"), 1), _file(str(tmp_path / "no-such-dir" / "b.gdc"), 2),
             (str(tmp_path / "c.gdc"), [Part(0, b"head"), Part(4096, torch.arange(250, dtype=torch.uint8)),
                                        Part(8192, torch.zeros(0, dtype=torch.uint8))])]
    errors = backend.write_files(files, durable=durable)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], FileNotFoundError) and "b.gdc" in str(errors[1])
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "c.gdc"]
    assert (tmp_path / "a.gdc").read_bytes() == bytes([1]) * (4096 + 5000)
    assert (tmp_path / "c.gdc").read_bytes() == b"head" + bytes(4092) + bytes(range(250))
    with pytest.raises(TypeError, match="uint8"):  # still refused before any file is created
        backend.write_files([_file(str(tmp_path / "y.gdc"), 1), (str(tmp_path / "z.gdc"), [Part(0, torch.zeros(3))])])
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "c.gdc"]


@pytest.mark.parametrize("way", ["kvikio", "native"])
def test_started_files_take_their_last_parts_at_finish(backend, tmp_path, way):
    """start_files writes the first parts (a payload) at once; finish adds the last (a header) and publishes; an
    abandoned batch leaves nothing; a bad last part is refused and nothing is left."""
    if way == "native":
        _use_native(backend)
    payload = torch.arange(200, dtype=torch.uint8)
    files = [(str(tmp_path / f"{name}.gdc"), [Part(4096, payload)]) for name in ("a", "b")]
    writing = backend.start_files(files)
    assert writing.finish([[Part(0, b"A")], [Part(0, b"B")]]) == [None, None]
    for name in ("a", "b"):
        assert (tmp_path / f"{name}.gdc").read_bytes() == name.upper().encode() + bytes(4095) + bytes(range(200))
    backend.start_files([(str(tmp_path / "gone.gdc"), [Part(4096, payload)])]).abandon()
    with pytest.raises(TypeError, match="uint8"):
        backend.start_files([(str(tmp_path / "bad.gdc"), [Part(4096, payload)])]).finish([[Part(0, torch.zeros(2))]])
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "b.gdc"]


@pytest.mark.parametrize("way", ["kvikio", "native"])
def test_a_batch_dropped_unfinished_leaves_nothing(backend, tmp_path, way, caplog):
    """Files started and then dropped (say, an interrupt between start and finish) are removed, the sources held
    until the writes have ended."""
    if way == "native":
        _use_native(backend)

    def start_and_drop() -> None:
        backend.start_files([(str(tmp_path / f"c{i}.gdc"), [Part(4096, torch.full((300_000,), i, dtype=torch.uint8))])
                             for i in range(3)])

    start_and_drop()
    assert os.listdir(tmp_path) == []
    assert "dropped unfinished" in caplog.text
