"""The kvikio backend on a real GPU: bit-exact files from and into CUDA buffers, the mode it reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from io_backends.base import Part
from io_backends.kvikio_backend import IO_MODES, KvikioBackend, cufile_refusal, detect_io_mode

MiB = 1 << 20


def _random_bytes(n: int, device: str = "cuda") -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)


def _writes_through(backend: KvikioBackend, way: str) -> None:
    """Send ``backend``'s writes through libgdscache_io.so (``native``) or kvikio; skip where the library is off."""
    from io_backends import native

    if way == "native" and not backend.native_writes:
        pytest.skip(f"batched native writes need io_mode kvikio-posix and {native.LIB_NAME}")
    backend.native_writes = way == "native"


def test_io_mode_is_what_kvikio_runs(kvikio_backend):
    import kvikio

    assert kvikio_backend.io_mode in IO_MODES
    assert kvikio_backend.io_mode == detect_io_mode(kvikio)
    if kvikio.defaults.is_compat_mode_preferred():
        assert kvikio_backend.io_mode == "kvikio-posix"
    print(f"io_mode={kvikio_backend.io_mode} compat_preferred={kvikio.defaults.is_compat_mode_preferred()}")


def test_io_mode_after_asking_cufile(tmp_path):
    """Where kvikio would drive cuFile, the backend runs and reports GPUDirect where cuFile has nvidia-fs and
    registers files in this directory, else kvikio's POSIX path (forced for every file). These VMs prefer the POSIX
    path unless /run/udev exists: ``GPU_CHECK_STEPS=udev`` creates it (cuFile then refuses their files),
    ``GPU_CHECK_STEPS=cufile`` adds the udev entry cuFile needs (it then registers them, in its compat mode)."""
    import kvikio
    import kvikio.cufile_driver
    import kvikio.defaults

    from io_backends import native

    if os.environ.get("KVIKIO_COMPAT_MODE", "AUTO").upper() != "AUTO":
        pytest.skip("KVIKIO_COMPAT_MODE is set: kvikio's path is the user's choice")
    compat_mode = kvikio.defaults.get("compat_mode")
    kvikio.defaults.set({"compat_mode": kvikio.CompatMode.AUTO})  # a backend built earlier may have set it for all
    if kvikio.defaults.is_compat_mode_preferred():
        kvikio.defaults.set({"compat_mode": compat_mode})
        pytest.skip("kvikio takes its POSIX path here without asking cuFile")
    refusal = cufile_refusal(str(tmp_path))
    gds = bool(kvikio.cufile_driver.properties.is_gds_available)
    backend = KvikioBackend(threads=2, probe_dir=str(tmp_path))
    try:
        print(f"cuFile refusal: {refusal}; nvidia-fs: {gds}; io_mode={backend.io_mode}")
        if gds and refusal is None:
            assert backend.io_mode == "gds"
        else:
            assert backend.io_mode == "kvikio-posix" and kvikio.defaults.is_compat_mode_preferred()
            assert backend.native_reads == backend.native_writes == native.available()
        payload = _random_bytes(3 * MiB)
        path = str(tmp_path / "c.gdc")
        backend.write_file(path, [Part(0, payload)])
        backend.drop_page_cache(path)
        back = torch.empty_like(payload)
        with backend.open_read(path) as handle:
            handle.read_into(back, 0)
        assert torch.equal(back, payload)
        assert os.listdir(tmp_path) == ["c.gdc"]
    finally:
        backend.close()
        kvikio.defaults.set({"compat_mode": compat_mode})


@pytest.mark.parametrize("writes", ["native", "kvikio"])
@pytest.mark.parametrize("nbytes", [4096, MiB, MiB + 123, 33 * MiB])
def test_gpu_round_trip_is_bit_exact(kvikio_backend, tmp_path, nbytes, writes):
    _writes_through(kvikio_backend, writes)
    path = str(tmp_path / "c.gdc")
    header = os.urandom(4096)
    payload = _random_bytes(nbytes)
    kvikio_backend.write_file(path, [Part(0, header), Part(4096, payload)])
    assert os.listdir(tmp_path) == ["c.gdc"]
    kvikio_backend.drop_page_cache(path)
    with kvikio_backend.open_read(path) as handle:
        assert handle.size == 4096 + nbytes
        assert handle.read_bytes(0, 4096) == header
        into_gpu = torch.full((nbytes,), 7, dtype=torch.uint8, device="cuda")
        handle.read_into(into_gpu, 4096)
        assert torch.equal(into_gpu, payload)
        into_host = torch.full((nbytes,), 7, dtype=torch.uint8)
        handle.read_into(into_host, 4096)
        assert torch.equal(into_host, payload.cpu())
        tail = torch.empty(100, dtype=torch.uint8, device="cuda")
        handle.read_into(tail, 4096 + nbytes - 100)
        assert torch.equal(tail, payload[-100:])


def test_scatter_read_submits_gpu_runs_before_the_header(kvikio_backend, tmp_path, monkeypatch):
    """A header (host run) and a payload (GPU run) land whole, and the payload's kvikio read is submitted before
    the header is read: the header's preadv then runs while the payload is under way."""
    from io_backends import kvikio_backend as module

    path = str(tmp_path / "c.gdc")
    header, payload = os.urandom(4096), _random_bytes(3 * MiB)
    kvikio_backend.write_file(path, [Part(0, header), Part(4096, payload)])
    calls: list[str] = []
    read_if_cached = module._read_if_cached
    monkeypatch.setattr(module, "_read_if_cached",
                        lambda fd, dest, offset: calls.append(f"preadv@{offset}") or read_if_cached(fd, dest, offset))

    class Recording:  # stands in for the kvikio CuFile, which takes no new attributes
        def __init__(self, inner):
            self.inner = inner

        def fileno(self):
            return self.inner.fileno()

        def pread(self, buf, size, offset):
            calls.append(f"kvikio@{offset}")
            return self.inner.pread(buf, size, offset)

    host, gpu = torch.zeros(4096, dtype=torch.uint8), torch.zeros(3 * MiB, dtype=torch.uint8, device="cuda")
    first, middle = torch.zeros(4096, dtype=torch.uint8, device="cuda"), torch.zeros(4096, dtype=torch.uint8)
    rest = torch.zeros(3 * MiB - 4096, dtype=torch.uint8, device="cuda")
    with kvikio_backend.open_read(path) as handle:
        inner = handle._handle
        handle._handle = Recording(inner)
        try:
            handle.start_read([host, gpu], 0)()
            assert calls[:2] == ["kvikio@4096", "preadv@0"]
            calls.clear()
            handle.start_read([first, middle, rest], 0)()  # a host run between GPU runs keeps its own offset
            assert calls[:3] == ["kvikio@0", f"kvikio@{2 * 4096}", "preadv@4096"]
        finally:
            handle._handle = inner
    assert host.numpy().tobytes() == header and torch.equal(gpu, payload)
    assert first.cpu().numpy().tobytes() == header and middle.numpy().tobytes() == payload[:4096].cpu().numpy().tobytes()
    assert torch.equal(rest, payload[4096:])


def test_host_parts_and_gaps(kvikio_backend, tmp_path):
    path = str(tmp_path / "h.gdc")
    host = _random_bytes(10_000, device="cpu")
    kvikio_backend.write_file(path, [Part(0, b"abc"), Part(8192, host)], durable=False)
    data = open(path, "rb").read()
    assert data[:3] == b"abc" and data[3:8192] == bytes(8189) and data[8192:] == host.numpy().tobytes()


def test_overwrite_is_atomic_and_leaves_no_temp(kvikio_backend, tmp_path):
    path = str(tmp_path / "c.gdc")
    first, second = _random_bytes(MiB), _random_bytes(2 * MiB)
    kvikio_backend.write_file(path, [Part(0, first)])
    with kvikio_backend.open_read(path) as handle:  # its handle is kept open afterwards
        back = torch.empty_like(first)
        handle.read_into(back, 0)
    assert torch.equal(back, first)
    kvikio_backend.write_file(path, [Part(0, second)])
    assert os.listdir(tmp_path) == ["c.gdc"]
    with kvikio_backend.open_read(path) as handle:
        out = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        handle.read_into(out, 0)
    assert torch.equal(out, second)


def test_errors_are_os_errors(kvikio_backend, tmp_path):
    with pytest.raises(FileNotFoundError):
        kvikio_backend.open_read(str(tmp_path / "missing.gdc"))
    with pytest.raises(OSError):
        kvikio_backend.write_file(str(tmp_path / "no-dir" / "x.gdc"), [Part(0, _random_bytes(4096))])
    assert os.listdir(tmp_path) == []
    path = str(tmp_path / "small.gdc")
    kvikio_backend.write_file(path, [Part(0, _random_bytes(4096))])
    with kvikio_backend.open_read(path) as handle, pytest.raises(OSError, match="short"):
        handle.read_into(torch.empty(8192, dtype=torch.uint8, device="cuda"), 0)


def test_registered_staging_buffer_is_reused(kvikio_backend, tmp_path):
    staging = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
    kvikio_backend.register_buffer(staging)
    kvikio_backend.register_buffer(staging)  # idempotent
    path = str(tmp_path / "r.gdc")
    payload = _random_bytes(4 * MiB)
    kvikio_backend.write_file(path, [Part(0, payload)])
    for _ in range(2):
        staging.fill_(0)
        with kvikio_backend.open_read(path) as handle:
            handle.read_into(staging, 0)
        assert torch.equal(staging, payload)
    kvikio_backend.deregister_buffer(staging)


@pytest.mark.parametrize("writes", ["native", "kvikio"])
@pytest.mark.parametrize("durable", [True, False])
def test_write_files_publishes_each_file_on_its_own(kvikio_backend, tmp_path, durable, writes):
    _writes_through(kvikio_backend, writes)
    # several files in flight and synced together; one that cannot be created fails alone and leaves nothing
    payloads = [_random_bytes(n) for n in (MiB, 4096, 3 * MiB + 10)]
    paths = [str(tmp_path / "a.gdc"), str(tmp_path / "missing-dir" / "b.gdc"), str(tmp_path / "c.gdc")]
    files = [(path, [Part(0, bytes(4096)), Part(4096, p)]) for path, p in zip(paths, payloads)]
    errors = kvikio_backend.write_files(files, durable=durable)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], OSError)
    assert sorted(os.listdir(tmp_path)) == ["a.gdc", "c.gdc"]  # no temporaries left
    for k in (0, 2):
        with kvikio_backend.open_read(paths[k]) as handle:
            back = torch.empty_like(payloads[k])
            handle.read_into(back, 4096)
        assert torch.equal(back, payloads[k])


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_read_batch_lands_every_run_and_fails_read_by_read(kvikio_backend, tmp_path, cold):
    """A batch of scatter reads through kvikio (host headers, GPU payloads in slices of one buffer, pieces beyond
    kvikio's task size) lands bit-exact; a read past its file's end fails alone."""
    sizes = [1, 4095, MiB + 123, 9 * MiB + 5]
    files = []
    for i, n in enumerate(sizes):
        path, header, payload = str(tmp_path / f"c{i}.gdc"), os.urandom(4096), _random_bytes(n)
        kvikio_backend.write_file(path, [Part(0, header), Part(4096, payload)])
        if cold:
            kvikio_backend.drop_page_cache(path)
        files.append((path, header, payload))
    slab = torch.zeros(sum(sizes) + 4096, dtype=torch.uint8, device="cuda")
    headers = torch.zeros(len(sizes), 4096, dtype=torch.uint8)
    handles = [kvikio_backend.open_read(path) for path, _, _ in files]
    reads, at = [], 0
    for i, n in enumerate(sizes):
        reads.append((handles[i], [headers[i], slab[at : at + n]], 0))
        at += n
    split = torch.zeros(MiB + 123, dtype=torch.uint8)  # host, GPU, host runs of one file
    gpu_part = torch.zeros(5000, dtype=torch.uint8, device="cuda")
    reads.append((handles[2], [split[:100], gpu_part, split[100 : 100 + 6000]], 4096))
    reads.append((handles[1], [slab[at : at + 4096]], 4096))  # 4096 bytes where the file has 4095
    try:
        errors = kvikio_backend.read_batch(reads)
    finally:
        for handle in handles:
            handle.close()
    assert errors[:5] == [None] * 5
    assert isinstance(errors[5], OSError) and "short" in str(errors[5])
    at = 0
    for i, (_, header, payload) in enumerate(files):
        assert headers[i].numpy().tobytes() == header
        assert torch.equal(slab[at : at + sizes[i]], payload)
        at += sizes[i]
    payload = files[2][2].cpu()
    assert torch.equal(split[:100], payload[:100]) and torch.equal(gpu_part.cpu(), payload[100:5100])
    assert torch.equal(split[100:6100], payload[5100:11100])


def test_native_reads_land_after_queued_work_on_their_buffer(kvikio_backend, tmp_path):
    """The library copies on its own streams: work this thread queued on the memory that read_files' buffer reuses
    runs first, so a fill queued before the read does not overwrite it."""
    if not kvikio_backend.native_reads:
        pytest.skip("batched native reads are off here")
    path, data = str(tmp_path / "c.gdc"), _random_bytes(4096 + 4 * MiB)
    kvikio_backend.write_file(path, [Part(0, data)])
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the fill
    scratch = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
    scratch.fill_(7)
    where = scratch.data_ptr()
    del scratch  # its memory goes back to this stream's pool, the fill still queued
    got = kvikio_backend.read_files([path], 4096, torch.device("cuda"), max_body=1 << 30)
    assert got.bodies[0].data_ptr() == where  # the read's buffer is that memory: the test can fail
    assert got.errors == [None] and torch.equal(got.bodies[0], data[4096:])


@pytest.mark.parametrize("native_reads", [True, False])
def test_files_read_whole_into_the_gpu(kvikio_backend, tmp_path, native_reads):
    """read_files: heads to the host, bodies into one GPU buffer, a missing file a miss of its own; through the
    library (in the background) or through kvikio (at once)."""
    if native_reads and not kvikio_backend.native_reads:
        pytest.skip("batched native reads are off here")
    kvikio_backend.native_reads = native_reads
    files = [(str(tmp_path / f"f{i}"), _random_bytes(4096 + n)) for i, n in enumerate((MiB, 5000, 3 * MiB + 1))]
    for path, data in files:
        kvikio_backend.write_file(path, [Part(0, data)])
    got = kvikio_backend.read_files([p for p, _ in files] + [str(tmp_path / "absent")], 4096, torch.device("cuda"),
                                    max_body=1 << 30, touch=True)
    assert kvikio_backend.reads_in_background == native_reads
    assert got.errors[:3] == [None] * 3 and isinstance(got.errors[3], FileNotFoundError)
    for i, (_, data) in enumerate(files):
        assert got.heads[i].tobytes() == data[:4096].cpu().numpy().tobytes()
        assert got.bodies[i].is_cuda and torch.equal(got.bodies[i], data[4096:])


def test_files_are_read_through_kvikio_where_the_library_cannot_start(kvikio_backend, tmp_path, monkeypatch, caplog):
    import errno

    from io_backends import native

    if not kvikio_backend.native_reads:
        pytest.skip("batched native reads are off here")

    def refuse(*args, **kwargs):
        raise OSError(errno.EAGAIN, "libgdscache_io.so could not start a worker thread")

    monkeypatch.setattr(native, "begin_read_files", refuse)
    path, data = str(tmp_path / "f"), _random_bytes(4096 + MiB)
    kvikio_backend.write_file(path, [Part(0, data)])
    before = len(os.listdir("/proc/self/fd"))
    got = kvikio_backend.read_files([path], 4096, torch.device("cuda"), max_body=1 << 30)
    assert got.errors == [None] and torch.equal(got.bodies[0], data[4096:])
    assert "read through kvikio" in caplog.text
    kvikio_backend.forget(path)  # kvikio's handle, kept open for later reads (OpenFiles)
    assert len(os.listdir("/proc/self/fd")) == before  # and none of the library's descriptors is left


def test_native_reads_are_on_where_kvikio_takes_its_posix_path(kvikio_backend):
    from io_backends import native

    expected = kvikio_backend.io_mode == "kvikio-posix" and native.available()
    assert kvikio_backend.native_reads == kvikio_backend.native_writes == expected
    assert kvikio_backend.batch_reads == kvikio_backend.batch_writes == ("libgdscache_io" if expected else "per file")
    direct = KvikioBackend(threads=2, o_direct="on")  # the library's reads are buffered: O_DIRECT reads stay with kvikio
    try:
        assert not direct.native_reads and direct.batch_reads == "per file"
        assert direct.native_writes == expected  # its writes take O_DIRECT where aligned
        kvikio_only = KvikioBackend(threads=2, native=False)  # the bench's raw ceiling: kvikio's own I/O
        assert not kvikio_only.native_reads and not kvikio_only.native_writes
        assert kvikio_only.batch_reads == kvikio_only.batch_writes == "per file"
        kvikio_only.close()
    finally:
        direct.close()
        KvikioBackend(threads=4).close()  # kvikio's settings are process-wide: put back the fixture's
    print(f"io_mode={kvikio_backend.io_mode} native_reads={kvikio_backend.native_reads}")


@pytest.mark.parametrize("o_direct", ["auto", "off"])
def test_native_writes_land_every_run_across_pieces(tmp_path, o_direct):
    """Batched native writes with pieces of 64 KiB: GPU runs of odd sizes at aligned and unaligned offsets (O_DIRECT
    for their aligned parts where allowed, the page cache for the rest), host runs between them, gaps left as zeros;
    every file reads back bit-exact through kvikio."""
    backend = KvikioBackend(threads=3, task_size=64 << 10, o_direct=o_direct)
    try:
        if not backend.native_writes:
            pytest.skip("batched native writes are off here")
        sizes = [1, 4096, 64 << 10, (64 << 10) + 1, 5 * (64 << 10) + 4096 + 7, 3 * MiB + 123]
        payloads = [_random_bytes(n) for n in sizes]
        host = _random_bytes(10_000, device="cpu")
        files = []
        for i, payload in enumerate(payloads):
            parts = [Part(0, os.urandom(4096)), Part(4096, payload)]
            if i % 2:  # a host run, then a GPU run at an unaligned offset past a gap
                end = 4096 + payload.numel()
                parts += [Part(end, host), Part(end + host.numel() + 3, payload[: 5000])]
            files.append((str(tmp_path / f"c{i}.gdc"), parts))
        assert backend.write_files(files) == [None] * len(files)
        assert sorted(os.listdir(tmp_path)) == sorted(f"c{i}.gdc" for i in range(len(files)))
        for path, parts in files:
            backend.drop_page_cache(path)
            data = Path(path).read_bytes()
            expected = bytearray(max(p.offset + p.nbytes for p in parts))
            for part in parts:
                raw = part.data if isinstance(part.data, bytes) else part.data.cpu().numpy().tobytes()
                expected[part.offset : part.offset + part.nbytes] = raw
            assert data == bytes(expected), path
    finally:
        backend.close()
        KvikioBackend(threads=4).close()  # kvikio's settings are process-wide: put back the fixture's


def test_native_writes_wait_for_queued_work_on_the_source(kvikio_backend, tmp_path):
    """The library copies on its own streams: a fill this thread queued on a source lands in the file."""
    _writes_through(kvikio_backend, "native")
    payload = torch.zeros(4 * MiB, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the fill
    payload.fill_(7)
    path = str(tmp_path / "c.gdc")
    kvikio_backend.write_file(path, [Part(0, payload)])
    assert Path(path).read_bytes() == bytes([7]) * (4 * MiB)


@pytest.mark.parametrize("writes", ["native", "kvikio"])
def test_started_files_take_their_headers_at_finish(kvikio_backend, tmp_path, writes):
    """start_files writes the GPU payloads (natively: from the start) and finish adds each header: every file whole;
    an abandoned batch leaves nothing."""
    _writes_through(kvikio_backend, writes)
    payloads = [_random_bytes(n) for n in (MiB, 5 * MiB + 3)]
    paths = [str(tmp_path / f"c{i}.gdc") for i in range(2)]
    writing = kvikio_backend.start_files([(path, [Part(4096, p)]) for path, p in zip(paths, payloads)])
    headers = [os.urandom(4096) for _ in paths]
    assert writing.finish([[Part(0, h)] for h in headers]) == [None, None]
    for path, header, payload in zip(paths, headers, payloads):
        assert Path(path).read_bytes() == header + payload.cpu().numpy().tobytes()
    kvikio_backend.start_files([(str(tmp_path / "gone.gdc"), [Part(4096, payloads[0])])]).abandon()
    assert sorted(os.listdir(tmp_path)) == ["c0.gdc", "c1.gdc"]
