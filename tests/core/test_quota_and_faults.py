"""Quota, eviction, disk-full and other storage faults."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest
import torch
from kvtestlib import make_kv

from gdscache import GDSCache
from io_backends.base import ALIGN, Part
from io_backends.posix import PosixBackend

CHUNK_ON_DISK = 8192  # 4 KiB header + 4 KiB payload for make_kv(2, ., 2, 8) float32 chunks of 16 tokens


def test_quota_holds_while_storing_three_times_the_quota(cache_dir):
    quota = 20 * CHUNK_ON_DISK
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", max_disk_bytes=quota) as cache:
        for i in range(6):  # 6 prompts x 10 chunks = 3x the quota
            tokens = list(range(i * 1000, i * 1000 + 160))
            assert cache.store(tokens, make_kv(2, 160, 2, 8, seed=i)) == 160
            assert cache.stats()["local_bytes"] <= quota
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".gdc"))
        assert on_disk <= quota
        last = list(range(5000, 5160))
        out = torch.zeros(2, 2, 160, 2, 8)
        assert cache.retrieve(last, out) == 160 and torch.equal(out, make_kv(2, 160, 2, 8, seed=5))
        assert cache.stats()["local_evictions"] == 40


def test_eviction_never_removes_a_chunk_being_read(cache_dir):
    kv = make_kv(2, 16, 2, 8)
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", max_disk_bytes=CHUNK_ON_DISK * 2) as cache:
        cache.store(list(range(16)), kv)
        key = cache.chunk_keys(list(range(16)))[0]
        local = cache._local
        entered, release = threading.Event(), threading.Event()
        real_read = local._read_payload

        def slow_read(*args):
            entered.set()
            release.wait(10)
            return real_read(*args)

        local._read_payload = slow_read
        reader = threading.Thread(target=lambda: local.read(cache.namespace, key, torch.device("cpu")))
        reader.start()
        entered.wait(10)
        freed = local.evict_to(0)  # asks to evict everything while the chunk is in use
        assert freed == 0 and os.path.exists(local.path_of(cache.namespace, key))
        release.set()
        reader.join()
        assert local.evict_to(0) == CHUNK_ON_DISK


class _FullDisk(PosixBackend):
    """A POSIX backend whose disk reports ENOSPC for every write after the first ``room`` ones."""

    def __init__(self, room: int) -> None:
        super().__init__(threads=1)  # one writer at a time keeps the fault sequence deterministic
        self.room = room

    def write_file(self, path, parts, *, durable=True):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.room -= 1
        super().write_file(path, parts, durable=durable)


class _FullDiskMidFile(PosixBackend):
    """Like :class:`_FullDisk`, but the disk fills up partway through a file: its temporary file exists and holds the
    file's first 4 KiB when the rest of the write fails."""

    def __init__(self, room: int) -> None:
        super().__init__(threads=1)
        self.room = room
        self.torn = 0

    def _write_parts(self, fd, parts, direct):
        if self.room <= 0:
            first = parts[0]
            super()._write_parts(fd, [Part(first.offset, first.data[:ALIGN])], direct)
            assert 0 < os.fstat(fd).st_size < max(p.offset + p.nbytes for p in parts)
            self.torn += 1
            raise OSError(errno.ENOSPC, "No space left on device (injected mid-file)")
        self.room -= 1
        super()._write_parts(fd, parts, direct)


@pytest.mark.parametrize("disk", [_FullDisk, _FullDiskMidFile])
def test_injected_enospc_fails_soft_and_keeps_existing_chunks(cache_dir, monkeypatch, caplog, disk):
    import gdscache.api

    backend = disk(room=4)
    monkeypatch.setattr(gdscache.api, "make_file_backend", lambda *a, **k: backend)
    first, second = make_kv(2, 64, 2, 8, seed=1), make_kv(2, 64, 2, 8, seed=2)
    a, b = list(range(64)), list(range(1000, 1064))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        assert cache.store(a, first) == 64
        # the disk is now full: the first ENOSPC evicts two LRU chunks once, the retry still fails,
        # and eviction then stays off so a disk filled by others does not drain the cache
        assert cache.store(b, second) == 0
        assert "disk full" in caplog.text
        stats = cache.stats()
        assert stats["local_enospc"] == 5 and stats["local_evictions"] == 2 and stats["local_chunks"] == 2
        kept = cache.chunk_keys(a)[2:]
        for i, key in enumerate(kept, start=2):
            meta, payload = cache._local.read(cache.namespace, key, torch.device("cpu"))
            assert torch.equal(payload.view(torch.float32).view(2, 2, 16, 2, 8), first[:, :, 16 * i : 16 * (i + 1)])
        assert cache.retrieve(b, torch.zeros_like(second)) == 0
        out = torch.zeros_like(first)
        assert cache.retrieve(a[:32], out[:, :, :32]) == 0  # its first two chunks were evicted for the retry
    temps = [f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".tmp")]
    assert temps == []  # the failed writes left nothing behind, not even the half-written ones
    if disk is _FullDiskMidFile:
        assert backend.torn == 5


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/bin/mount"), reason="mounting a tmpfs needs root")
def test_real_full_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        prompts = [(list(range(i * 100, i * 100 + 32)), make_kv(2, 32, 2, 8, seed=i)) for i in range(32)]
        with GDSCache(path=str(mnt), chunk_size=16, model_id="m") as cache:  # 64 chunks of 8 KiB: twice the disk
            for tokens, kv in prompts:
                cache.store(tokens, kv)
            assert cache.stats()["local_enospc"] >= 1
            tokens, kv = prompts[-1]
            out = torch.zeros_like(kv)
            assert cache.retrieve(tokens, out) == 32 and torch.equal(out, kv)  # the newest prompt survived
            for tokens, kv in prompts:  # whatever else survived is exact
                out = torch.zeros_like(kv)
                n = cache.retrieve(tokens, out)
                assert torch.equal(out[:, :, :n], kv[:, :, :n])
            assert cache.stats()["local_corrupt"] == 0
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unreadable_file_is_a_miss_not_an_exception(cache_dir):
    kv = make_kv(2, 32, 2, 8)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        path = cache._local.path_of(cache.namespace, cache.chunk_keys(tokens)[1])
        os.unlink(path)
        os.mkdir(path)  # reading a directory raises IsADirectoryError
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 16


def _chunks(n: int, seed: int) -> list:
    """``n`` raw chunks (8 KiB files) with keys of their own, as the API hands them to the local tier."""
    from gdscache.format.chunkfile import make_meta
    from gdscache.spec import KVSpec

    spec = KVSpec.of(make_kv(2, 16, 2, 8))
    out = []
    for i in range(n):
        payload = make_kv(2, 16, 2, 8, seed=seed + i).reshape(-1).view(torch.uint8).clone()
        out.append((make_meta(bytes([seed, i]) * 8, NS, spec, 16, "raw", {}, payload), payload))
    return out


NS = b"n" * 16


def test_group_write_on_a_full_disk_keeps_what_it_published(tmp_path):
    from gdscache.tiers.local import LocalTier

    tier = LocalTier(str(tmp_path), _FullDisk(room=3))
    assert tier.write_many(NS, _chunks(1, 0)) == [True]
    group = _chunks(4, 10)
    # two files fit, two hit ENOSPC; the eviction that makes room for their retry must not take the two just
    # published (the retry fails again: the disk is full of other data)
    assert tier.write_many(NS, group) == [True, True, False, False]
    assert tier.stats.evictions == 1 and len(tier) == 2 and tier.used_bytes == 2 * CHUNK_ON_DISK
    for meta, payload in group[:2]:
        got_meta, got = tier.read(NS, meta.key, torch.device("cpu"))
        assert got_meta.key == meta.key and torch.equal(got, payload)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]


def test_group_write_honours_the_quota(tmp_path):
    from gdscache.tiers.local import LocalTier

    tier = LocalTier(str(tmp_path), PosixBackend(threads=2), max_bytes=3 * CHUNK_ON_DISK)
    group = _chunks(8, 20)
    assert tier.write_many(NS, group) == [True] * 8
    assert tier.used_bytes <= 3 * CHUNK_ON_DISK and len(tier) == 3
    on_disk = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".gdc")]
    assert len(on_disk) == 3
    for meta, payload in group[-3:]:  # the newest stay
        assert torch.equal(tier.read(NS, meta.key, torch.device("cpu"))[1], payload)


def test_leading_lookups_stop_at_the_first_chunk_not_held(tmp_path):
    """contains_many(leading=True) answers up to the first key the tier does not hold: a later chunk that another
    process published (not yet in this tier's index) is not looked for; without it, every key is."""
    from gdscache.tiers.local import LocalTier

    tier = LocalTier(str(tmp_path), PosixBackend(threads=2))
    mine, theirs = _chunks(2, 30), _chunks(1, 40)
    assert tier.write_many(NS, mine) == [True, True]
    other = LocalTier(str(tmp_path), PosixBackend(threads=2))  # another process: its chunk is unknown to ``tier``
    assert other.write_many(NS, theirs) == [True]
    keys = [mine[0][0].key, mine[1][0].key, b"\0" * 16, theirs[0][0].key]
    assert tier.contains_many(NS, keys, leading=True) == [True, True, False]
    assert len(tier) == 2  # the chunk after the miss was not looked for
    assert tier.contains_many(NS, keys[:2], leading=True) == [True, True]
    assert tier.contains_many(NS, keys) == [True, True, False, True]
    assert len(tier) == 3  # found by its file, now indexed


def test_a_store_that_fails_midway_returns_after_the_writes_it_started(cache_dir, monkeypatch):
    """cachegen refuses the fourth chunk (a nan): store raises, but only once the three chunks before it, handed to
    the I/O threads already (and slowed down here), are on disk."""
    from gdscache.tiers.local import LocalTier

    write_many = LocalTier.write_many

    def slow_write_many(self, *args, **kwargs):
        time.sleep(0.3)
        return write_many(self, *args, **kwargs)

    monkeypatch.setattr(LocalTier, "write_many", slow_write_many)
    kv = make_kv(2, 64, 2, 8)
    kv[1, 0, 50, 1, 3] = float("nan")
    tokens = list(range(64))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", codec="cachegen") as cache:
        with pytest.raises(ValueError, match="non-finite"):
            cache.store(tokens, kv)
        assert cache.lookup(tokens) == 48
        assert cache.stats()["chunks_written"] == 3


def test_chunks_started_and_dropped_give_back_their_reservation(tmp_path, caplog):
    """LocalTier.start_many reserves quota and pins the keys; chunks dropped unfinished give both back and store
    nothing, and a finished or abandoned group cannot be ended twice."""
    from gdscache.tiers.local import LocalTier

    tier = LocalTier(str(tmp_path / "cache"), PosixBackend(threads=2), max_bytes=1 << 30)
    payload = torch.zeros(5000, dtype=torch.uint8)
    tier.start_many(b"n" * 16, [(bytes([k]) * 32, payload) for k in range(3)])
    assert tier.used_bytes == 0 and not tier._in_use and len(tier) == 0
    assert "dropped unfinished" in caplog.text
    writing = tier.start_many(b"n" * 16, [(b"k" * 32, payload)])
    writing.abandon()
    with pytest.raises(RuntimeError, match="already finished or abandoned"):
        writing.abandon()
    assert tier.used_bytes == 0
