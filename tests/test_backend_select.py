"""Backend selection and the kvikio backend's file logic, on a machine without CUDA.

kvikio can do no I/O without libcuda, so the kvikio backend runs here against a stand-in module
that does host I/O with plain pread/pwrite; the real thing is tested in tests/gpu/.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import sys
import types
from typing import ClassVar

import pytest
import torch

import io_backends
from io_backends import PosixBackend, make_file_backend
from io_backends.base import Part


class _Future:
    def __init__(self, value: int) -> None:
        self._value = value

    def get(self) -> int:
        return self._value


class _FakeCuFile:
    """kvikio.CuFile's surface over host memory; ``fail_writes`` makes pwrite raise like kvikio does."""

    fail_writes = False
    preads = 0
    opened: ClassVar[list[_FakeCuFile]] = []  # every handle opened for reading, in order

    def __init__(self, path: str, flags: str = "r") -> None:
        mode = os.O_RDONLY if flags == "r" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, mode, 0o644)
        except OSError as exc:
            raise RuntimeError(f"cannot open {path}: {exc.strerror}") from None
        self.closed = False
        if flags == "r":
            _FakeCuFile.opened.append(self)

    def fileno(self) -> int:
        return self._fd

    def pwrite(self, buf, size, file_offset=0, task_size=None):
        if _FakeCuFile.fail_writes:
            raise RuntimeError("posix write failed: No space left on device")
        return _Future(os.pwrite(self._fd, memoryview(buf)[:size], file_offset))

    def pread(self, buf, size, file_offset=0, task_size=None):
        _FakeCuFile.preads += 1
        return _Future(os.preadv(self._fd, [memoryview(buf)[:size]], file_offset))

    def close(self) -> None:
        os.close(self._fd)
        self.closed = True


@pytest.fixture
def fake_kvikio(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Pretend CUDA and kvikio exist; returns knobs for the compat/GDS answers kvikio would give."""
    knobs = types.SimpleNamespace(compat_preferred=True, gds_available=False, settings={}, compat_mode="AUTO")
    kvikio = types.ModuleType("kvikio")
    defaults = types.ModuleType("kvikio.defaults")

    def set_(config: dict) -> None:
        knobs.settings.update(config)
        if "compat_mode" in config:
            knobs.compat_mode = config["compat_mode"]
            knobs.compat_preferred = config["compat_mode"] == "ON"

    defaults.set = set_
    defaults.get = lambda key: {"compat_mode": knobs.compat_mode}[key]
    defaults.is_compat_mode_preferred = lambda: knobs.compat_preferred
    kvikio.CompatMode = types.SimpleNamespace(ON="ON", OFF="OFF", AUTO="AUTO")
    driver = types.ModuleType("kvikio.cufile_driver")
    driver.properties = type("DriverProperties", (), {"is_gds_available": property(lambda _: knobs.gds_available)})()
    kvikio.defaults, kvikio.cufile_driver, kvikio.CuFile = defaults, driver, _FakeCuFile
    kvikio.__version__ = "stand-in"
    monkeypatch.setitem(sys.modules, "kvikio", kvikio)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", defaults)
    monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_FakeCuFile, "fail_writes", False)
    monkeypatch.setattr(_FakeCuFile, "opened", [])
    monkeypatch.setattr(_FakeCuFile, "preads", 0)
    return knobs


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_posix_is_forced_without_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend = make_file_backend("posix", threads=2, o_direct="off")
    try:
        assert isinstance(backend, PosixBackend)
        assert backend.io_mode == "posix-buffered"
    finally:
        backend.close()
    assert _warnings(caplog) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_gds_without_cuda_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend = make_file_backend("gds", threads=2)
    backend.close()
    assert isinstance(backend, PosixBackend)
    (message,) = _warnings(caplog)
    assert "gds" in message and "no CUDA" in message and "\n" not in message


def test_gds_without_kvikio_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "kvikio", None)  # makes `import kvikio` raise ImportError
    backend = make_file_backend("gds", threads=2)
    backend.close()
    assert isinstance(backend, PosixBackend)
    (message,) = _warnings(caplog)
    assert "kvikio" in message


@pytest.mark.parametrize(
    "kwargs, word", [({"storage": "nvme"}, "storage"), ({"storage": "gds", "o_direct": "yes"}, "o_direct")]
)
def test_bad_arguments_are_named(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        make_file_backend(**kwargs)


@pytest.mark.parametrize(
    "compat, gds, setting, mode",
    [(True, True, "AUTO", "kvikio-posix"), (False, True, "AUTO", "gds"), (False, False, "OFF", "cufile-compat")],
)
def test_gds_with_cuda_uses_kvikio_and_reports_mode(fake_kvikio, compat: bool, gds: bool, setting: str,
                                                     mode: str) -> None:
    fake_kvikio.compat_preferred, fake_kvikio.gds_available, fake_kvikio.compat_mode = compat, gds, setting
    backend = make_file_backend("gds", threads=3, o_direct="auto")
    try:
        assert type(backend).__name__ == "KvikioBackend"
        assert backend.io_mode == mode
        assert backend.gpu_native
        assert fake_kvikio.settings == {
            "num_threads": 3, "task_size": 4 << 20, "auto_direct_io_write": True, "auto_direct_io_read": False,
        }
    finally:
        backend.close()


@pytest.mark.parametrize("directory", [True, False])
def test_cufile_without_nvidia_fs_gives_way_to_kvikio_posix(fake_kvikio, fake_cufile, tmp_path, caplog,
                                                             directory: bool) -> None:
    """Where kvikio would drive cuFile of its own accord but cuFile has no nvidia-fs (its compat mode: O_DIRECT
    reads, no page-cache hits), kvikio's POSIX path is set for every file and reported, with one line at INFO saying
    why; cuFile is not asked to register anything."""
    fake_kvikio.compat_preferred, fake_kvikio.gds_available = False, False
    caplog.set_level(logging.INFO, logger="gdscache")
    for _ in range(2):  # the choice holds for the process: said once
        backend = make_file_backend("gds", threads=2, directory=str(tmp_path) if directory else None)
        backend.close()
        assert backend.io_mode == "kvikio-posix" and fake_kvikio.compat_mode == "ON"
    assert fake_cufile.registered == []
    (message,) = [r.getMessage() for r in caplog.records if "nvidia-fs" in r.getMessage()]
    assert "page cache" in message and "KVIKIO_COMPAT_MODE=OFF" in message and "\n" not in message
    assert _warnings(caplog) == []


@pytest.fixture
def fake_cufile(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """``cuda.bindings.cufile``'s handle registration over real files: ``refuse`` makes it raise as cuFile does on
    a VM without a udev database; ``registered`` records each probed file's name and whether it was open O_DIRECT."""
    knobs = types.SimpleNamespace(refuse=False, registered=[])
    cufile = types.ModuleType("cuda.bindings.cufile")

    class Descr:
        def __init__(self) -> None:
            self.handle = types.SimpleNamespace(fd=-1)
            self.ptr = self

    def handle_register(descr: Descr) -> int:
        info = pathlib.Path(f"/proc/self/fdinfo/{descr.handle.fd}").read_text()
        flags = int(info.split("flags:")[1].split()[0], 8)
        knobs.registered.append((os.readlink(f"/proc/self/fd/{descr.handle.fd}"), bool(flags & os.O_DIRECT)))
        if knobs.refuse:
            raise RuntimeError("cuFileError: CU_FILE_INTERNAL_ERROR (unable to get volume attributes)")
        return 7

    cufile.Descr, cufile.FileHandleType = Descr, types.SimpleNamespace(OPAQUE_FD=1)
    cufile.driver_open, cufile.handle_register, cufile.handle_deregister = lambda: None, handle_register, lambda h: None
    bindings = types.ModuleType("cuda.bindings")
    bindings.cufile = cufile
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    return knobs


@pytest.mark.parametrize("refuse, mode", [(True, "kvikio-posix"), (False, "gds")])
def test_cufile_is_asked_once_in_the_cache_directory(fake_kvikio, fake_cufile, tmp_path, caplog, refuse: bool,
                                                     mode: str) -> None:
    """Where kvikio would drive cuFile with GPUDirect, one file in the directory is registered first; a refusal
    forces kvikio's POSIX path for every file (one warning naming the directory and cuFile's error) instead of a
    failed registration per chunk file under a cuFile io_mode."""
    fake_kvikio.compat_preferred, fake_kvikio.gds_available, fake_cufile.refuse = False, True, refuse
    backend = make_file_backend("gds", threads=2, directory=str(tmp_path))
    backend.close()
    assert backend.io_mode == mode
    ((probed, direct),) = fake_cufile.registered
    assert os.path.dirname(probed) == str(tmp_path) and direct
    assert os.listdir(tmp_path) == []  # the probe file is gone
    assert fake_kvikio.compat_mode == ("ON" if refuse else "AUTO")
    warnings = _warnings(caplog)
    if refuse:
        (message,) = warnings
        assert str(tmp_path) in message and "volume attributes" in message and "POSIX" in message
    else:
        assert warnings == []


def test_gds_without_a_directory_is_not_probed(fake_kvikio, fake_cufile) -> None:
    """With GPUDirect and no directory to try a file in, cuFile is trusted: no probe, ``gds`` reported."""
    fake_kvikio.compat_preferred, fake_kvikio.gds_available, fake_cufile.refuse = False, True, True
    backend = make_file_backend("gds", threads=2)
    backend.close()
    assert fake_cufile.registered == [] and backend.io_mode == "gds" and fake_kvikio.compat_mode == "AUTO"


@pytest.mark.parametrize("setting, preferred", [("AUTO", True), ("OFF", False)])
def test_cufile_is_not_asked_where_kvikio_decided(fake_kvikio, fake_cufile, tmp_path, caplog, setting: str,
                                                  preferred: bool) -> None:
    """No probe where kvikio already takes its POSIX path, nor where the user set ``KVIKIO_COMPAT_MODE=OFF``
    (cuFile or nothing: its errors then surface as failed writes, not as a quiet switch; and its compat mode is
    kept)."""
    fake_kvikio.compat_preferred, fake_kvikio.compat_mode, fake_cufile.refuse = preferred, setting, True
    caplog.set_level(logging.INFO, logger="gdscache")
    backend = make_file_backend("gds", threads=2, directory=str(tmp_path))
    backend.close()
    assert fake_cufile.registered == []
    assert backend.io_mode == ("kvikio-posix" if preferred else "cufile-compat")
    assert fake_kvikio.compat_mode == setting
    assert not [r for r in caplog.records if "nvidia-fs" in r.getMessage()]


def test_kvikio_write_read_round_trip(fake_kvikio, tmp_path) -> None:
    backend = make_file_backend("gds", threads=2)
    path = str(tmp_path / "chunk.gdc")
    payload = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    header = bytes(range(256)) * 16
    try:
        backend.write_file(path, [Part(0, header), Part(4096, payload)])
        assert sorted(os.listdir(tmp_path)) == ["chunk.gdc"]
        with backend.open_read(path) as handle:
            assert handle.size == 4096 + payload.numel()
            assert handle.read_bytes(0, 4096) == header
            out = torch.empty_like(payload)
            handle.read_into(out, 4096)
            assert torch.equal(out, payload)
            with pytest.raises(OSError, match="short file"):
                handle.read_into(torch.empty(10, dtype=torch.uint8), handle.size - 5)
        backend.write_file(path, [Part(0, b"new"), Part(8, payload[:4])], durable=False)
        with open(path, "rb") as f:
            assert f.read() == b"new" + bytes(5) + payload[:4].numpy().tobytes()
    finally:
        backend.close()


def test_kvikio_failed_write_leaves_old_file_and_no_temp(fake_kvikio, tmp_path) -> None:
    backend = make_file_backend("gds", threads=2)
    backend.native_writes = False  # the failure is injected into the fake kvikio's writes
    path = str(tmp_path / "chunk.gdc")
    try:
        backend.write_file(path, [Part(0, b"old")])
        _FakeCuFile.fail_writes = True
        with pytest.raises(OSError) as info:
            backend.write_file(path, [Part(0, b"hdr"), Part(4096, torch.ones(8, dtype=torch.uint8))])
        assert info.value.errno == errno.ENOSPC
        assert sorted(os.listdir(tmp_path)) == ["chunk.gdc"]
        assert open(path, "rb").read() == b"old"
        with pytest.raises(OSError):
            backend.write_file(str(tmp_path / "missing-dir" / "x.gdc"), [Part(0, b"x")])
    finally:
        backend.close()


def test_kvikio_open_missing_file_is_file_not_found(fake_kvikio, tmp_path) -> None:
    backend = make_file_backend("gds", threads=1)
    try:
        with pytest.raises(FileNotFoundError):
            backend.open_read(str(tmp_path / "gone.gdc"))
        with pytest.raises(TypeError, match="uint8"):
            backend.write_file(str(tmp_path / "x.gdc"), [Part(0, torch.ones(4, dtype=torch.float32))])
    finally:
        backend.close()


def _read_all(backend, path: str) -> bytes:
    with backend.open_read(path) as handle:
        return handle.read_bytes(0, handle.size)


def test_kvikio_read_handles_stay_open_for_the_same_file(fake_kvikio, tmp_path) -> None:
    """A file is opened once for any number of reads; a file renamed over its path (a rewrite, by the backend or by
    another process) or removed is never read through the old handle."""
    backend = make_file_backend("gds", threads=2)
    path = str(tmp_path / "c.gdc")
    try:
        backend.write_file(path, [Part(0, b"first")])
        assert [_read_all(backend, path) for _ in range(3)] == [b"first"] * 3
        (handle,) = _FakeCuFile.opened
        assert not handle.closed
        backend.write_file(path, [Part(0, b"second")])  # through the backend: the old handle goes at once
        assert handle.closed and _read_all(backend, path) == b"second"
        other = str(tmp_path / "other")
        with open(other, "wb") as f:
            f.write(b"third")
        os.rename(other, path)  # behind the backend's back: noticed by inode
        assert _read_all(backend, path) == b"third" and len(_FakeCuFile.opened) == 3
        assert _FakeCuFile.opened[1].closed
        os.unlink(path)  # removed behind the backend's back: the failed open lets go of the handle
        with pytest.raises(FileNotFoundError):
            backend.open_read(path)
        assert all(h.closed for h in _FakeCuFile.opened)
    finally:
        backend.close()


def test_kvikio_lets_go_of_files_another_process_deleted(fake_kvikio, tmp_path, monkeypatch) -> None:
    """A kept handle must not hold the disk space of a file deleted behind the backend's back, even if its path is
    never read again: a sweep on a later read lets go of every kept file that has lost its name."""
    from io_backends.kvikio_backend import OpenFiles

    backend = make_file_backend("gds", threads=1)
    paths = [str(tmp_path / f"{i}.gdc") for i in range(3)]
    try:
        for path in paths:
            backend.write_file(path, [Part(0, b"x" * 10)])
            assert _read_all(backend, path) == b"x" * 10
        os.unlink(paths[0])
        assert _read_all(backend, paths[1]) == b"x" * 10  # within SWEEP_S of the start: no sweep yet
        assert [h.closed for h in _FakeCuFile.opened] == [False, False, False]
        monkeypatch.setattr(OpenFiles, "SWEEP_S", 0.0)
        assert _read_all(backend, paths[2]) == b"x" * 10
        assert [h.closed for h in _FakeCuFile.opened] == [True, False, False]
    finally:
        backend.close()


def test_kvikio_keeps_at_most_keep_open_handles_and_closes_none_in_use(fake_kvikio, tmp_path) -> None:
    from io_backends.kvikio_backend import KvikioBackend

    backend = KvikioBackend(threads=1, keep_open=2)
    paths = [str(tmp_path / f"{i}.gdc") for i in range(3)]
    try:
        for i, path in enumerate(paths):
            backend.write_file(path, [Part(0, bytes([i]) * 10)])
        in_use = backend.open_read(paths[0])
        for path in paths[1:]:
            assert len(_read_all(backend, path)) == 10
        first = _FakeCuFile.opened[0]
        assert not first.closed  # let go of (least recently used) but still being read
        assert in_use.read_bytes(0, 10) == bytes(10)
        in_use.close()
        in_use.close()  # idempotent
        assert first.closed and [h.closed for h in _FakeCuFile.opened[1:]] == [False, False]
    finally:
        backend.close()
    assert all(h.closed for h in _FakeCuFile.opened)
    unkept = KvikioBackend(threads=1, keep_open=0)
    try:
        assert _read_all(unkept, paths[1]) == bytes([1]) * 10
        assert _FakeCuFile.opened[-1].closed
    finally:
        unkept.close()


def test_evicted_and_quarantined_chunks_hold_no_open_handle(fake_kvikio, tmp_path) -> None:
    """The local tier tells the backend when it removes a file: no kept handle holds a removed chunk's disk space."""
    from gdscache import GDSCache

    def live_targets() -> list[str]:
        return [os.readlink(f"/proc/self/fd/{h.fileno()}") for h in _FakeCuFile.opened if not h.closed]

    kv = torch.arange(2 * 2 * 64 * 2 * 8, dtype=torch.float32).reshape(2, 2, 64, 2, 8)
    out = torch.zeros_like(kv)
    first, second = list(range(64)), list(range(1000, 1064))
    with GDSCache(path=str(tmp_path), chunk_size=16, model_id="m", storage="gds", max_disk_bytes=4 * 8192) as cache:
        assert cache.store(first, kv) == 64
        assert cache.retrieve(first, out) == 64 and torch.equal(out, kv)
        assert len(live_targets()) == 4  # kept open after the read
        assert cache.store(second, kv) == 64  # evicts the first prompt's four chunks
        assert cache.stats()["local_evictions"] == 4
        assert live_targets() == []
        assert cache.retrieve(second, out) == 64
        path = cache._local.path_of(cache.namespace, cache.chunk_keys(second)[1])
        assert path in live_targets()
        cache._local.quarantine(path, "test")
        assert len(live_targets()) == 3 and all(os.path.exists(target) for target in live_targets())


def test_kvikio_host_reads_of_cached_bytes_skip_kvikio(fake_kvikio, tmp_path, monkeypatch) -> None:
    """Host runs the page cache holds are copied by one non-blocking preadv; what it cannot fill goes to kvikio."""
    from io_backends import kvikio_backend

    monkeypatch.setattr(kvikio_backend, "_NOWAIT_READS", hasattr(os, "RWF_NOWAIT"))
    backend = make_file_backend("gds", threads=1)
    path = str(tmp_path / "c.gdc")
    data = torch.randint(0, 256, (3 * 4096,), dtype=torch.uint8)
    try:
        backend.write_file(path, [Part(0, data)])
        with backend.open_read(path) as handle:
            header, body = torch.zeros(4096, dtype=torch.uint8), torch.zeros(8192, dtype=torch.uint8)
            handle.start_read([header, body], 0)()
            assert torch.equal(torch.cat([header, body]), data)
            assert _FakeCuFile.preads == (0 if hasattr(os, "RWF_NOWAIT") else 2)
            with open(path, "r+b") as f:  # the file shrinks behind the handle: preadv comes up short, kvikio too
                f.truncate(3 * 4096 - 50)
            with pytest.raises(OSError, match="short read"):
                handle.start_read([torch.zeros(150, dtype=torch.uint8)], 3 * 4096 - 150)()
            assert _FakeCuFile.preads == (1 if hasattr(os, "RWF_NOWAIT") else 3)
    finally:
        backend.close()


@pytest.mark.parametrize("fault", [RuntimeError("posix read failed"), KeyboardInterrupt()])
def test_kvikio_scatter_read_that_fails_to_submit_waits_for_what_it_submitted(fake_kvikio, tmp_path, monkeypatch,
                                                                            fault) -> None:
    """A run kvikio refuses (or an interrupt) while others are in flight: those land before start_read raises, so the
    caller may reuse their buffers; kvikio's RuntimeError comes out as an OSError."""
    from io_backends import kvikio_backend

    monkeypatch.setattr(kvikio_backend, "_NOWAIT_READS", False)
    backend = make_file_backend("gds", threads=1)
    path = str(tmp_path / "c.gdc")
    waited: list[int] = []

    class Tracked(_Future):
        def get(self) -> int:
            waited.append(self._value)
            return super().get()

    def pread(self, buf, size, file_offset=0, task_size=None):
        if file_offset:
            raise fault
        return Tracked(os.preadv(self._fd, [memoryview(buf)[:size]], file_offset))

    try:
        backend.write_file(path, [Part(0, torch.ones(2 * 4096, dtype=torch.uint8))])
        monkeypatch.setattr(_FakeCuFile, "pread", pread)
        with backend.open_read(path) as handle:
            first, second = torch.zeros(4096, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)
            with pytest.raises(OSError if isinstance(fault, RuntimeError) else KeyboardInterrupt):
                handle.start_read([first, second], 0)
            assert waited == [4096] and bool(first.eq(1).all())
    finally:
        backend.close()


def test_selector_is_exported() -> None:
    assert io_backends.make_file_backend is make_file_backend
