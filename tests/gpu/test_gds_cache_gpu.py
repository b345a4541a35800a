"""GDSCache with ``storage: gds`` on a real GPU: bit-exact KV, across processes, corrupt files are misses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import threading
import time

import pytest
import torch
from kvtestlib import PYTHON, make_kv, python_env

from gdscache import GDSCache
from io_backends import native
from io_backends.kvikio_backend import IO_MODES

CHUNK = 256


@pytest.fixture(autouse=True)
def _needs_kvikio():
    pytest.importorskip("kvikio")


def _open(path: str, **extra) -> GDSCache:
    return GDSCache(path=path, chunk_size=CHUNK, model_id="gpu-test", storage="gds", io_threads=4, **extra)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _chunk_files(path: str) -> set[str]:
    return set(glob.glob(os.path.join(path, "*", "*", "*.gdc")))


def test_gpu_round_trip_bit_exact_and_mode(cache_dir):
    kv = make_kv(4, 3 * CHUNK + 100, 2, 64, dtype=torch.bfloat16, seed=3, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir) as cache:
        assert cache.io_mode in IO_MODES
        assert cache.store(tokens, kv) == 3 * CHUNK
        assert cache.lookup(tokens) == 3 * CHUNK
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 3 * CHUNK
        assert torch.equal(_bits(out[:, :, : 3 * CHUNK]), _bits(kv[:, :, : 3 * CHUNK]))
        stats = cache.stats()
        assert stats["io_mode"] == cache.io_mode
        native_reads = cache.io_mode == "kvikio-posix" and native.available()
        assert stats["batch_reads"] == ("libgdscache_io" if native_reads else "per file")
        print(f"io_mode={stats['io_mode']} batch_reads={stats['batch_reads']}")


_CHILD = """
import json, sys, torch
from gdscache import GDSCache
path, ref = sys.argv[1], torch.load(sys.argv[2])
tokens = list(range(ref.shape[2]))
with GDSCache(path=path, chunk_size=256, model_id="gpu-test", storage="gds", io_threads=4) as cache:
    out = torch.full(ref.shape, float("nan"), dtype=ref.dtype, device="cuda")
    n = cache.retrieve(tokens, out)
    same = torch.equal(out[:, :, :n].cpu().view(torch.int16), ref[:, :, :n].view(torch.int16))
    print(json.dumps({"n": n, "same": same, "io_mode": cache.io_mode}))
"""


def test_restart_in_new_process_is_bit_exact(cache_dir, tmp_path):
    kv = make_kv(8, 4 * CHUNK, 2, 128, dtype=torch.bfloat16, seed=4, device="cuda")
    with _open(cache_dir) as cache:
        assert cache.store(list(range(kv.shape[2])), kv) == 4 * CHUNK
    ref = str(tmp_path / "ref.pt")
    torch.save(kv.cpu(), ref)
    run = subprocess.run([PYTHON, "-c", _CHILD, cache_dir, ref], env=python_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"n": 4 * CHUNK, "same": True, "io_mode": result["io_mode"]}
    assert result["io_mode"] in IO_MODES


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_chunk_is_a_miss(cache_dir, where):
    kv = make_kv(4, 2 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=5, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir) as cache:
        cache.store(tokens[:CHUNK], kv[:, :, :CHUNK])
        first = _chunk_files(cache_dir)
        cache.store(tokens, kv)
        (second,) = _chunk_files(cache_dir) - first
    offset = 4096 + 1000 if where == "payload" else 40
    with open(second, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))
    with _open(cache_dir) as cache:
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == CHUNK
        assert torch.equal(_bits(out[:, :, :CHUNK]), _bits(kv[:, :, :CHUNK]))
        assert cache.lookup(tokens) <= 2 * CHUNK
        assert cache.retrieve(tokens, out) == CHUNK  # still a miss on the second try


def test_a_chunk_file_grown_past_its_indexed_size_is_a_miss_then_quarantined(cache_dir):
    """The library reads a group's files by their indexed sizes: one that has grown is not read (a miss, its size
    looked up anew), and the next read finds it corrupt (its payload is not the header's); the chunks before it
    come back exact throughout."""
    kv = make_kv(4, 3 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=6, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir) as cache:
        assert cache.store(tokens, kv) == 3 * CHUNK
        with open(cache._local.path_of(cache.namespace, cache.chunk_keys(tokens)[1]), "ab") as f:
            f.write(os.urandom(8192))
        for _ in range(3):
            out = torch.full_like(kv, float("nan"))
            assert cache.retrieve(tokens, out) == CHUNK
            assert torch.equal(_bits(out[:, :, :CHUNK]), _bits(kv[:, :, :CHUNK]))
        assert cache.stats()["local_corrupt"] == 1


class _GroupsSeen:
    """Which threads begin a cache's fetch tasks, and how many are begun and not yet ended at most."""

    def __init__(self, cache: GDSCache, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        self.open = self.most = 0
        real = cache._start_fetch_group

        def start(*args):
            self.threads.append(threading.get_ident())
            end = real(*args)
            self.open += 1
            self.most = max(self.most, self.open)

            def finish():
                self.open -= 1
                return end()

            return finish

        monkeypatch.setattr(cache, "_start_fetch_group", start)


def test_groups_are_read_on_the_callers_thread_a_few_in_flight(cache_dir, monkeypatch):
    """Into a GPU, every fetch task runs on the caller's thread, PIPELINE_GROUPS begun before the first is ended;
    a corrupt chunk in a later group still ends the prefix there, and what comes before it is exact."""
    from gdscache import api

    monkeypatch.setattr(api, "GROUP_CHUNKS", 2)
    kv = make_kv(2, 12 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=8, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir) as cache:
        assert cache.store(tokens, kv) == 12 * CHUNK
        if not cache._backend.reads_in_background:
            pytest.skip("the backend reads at once here")
        groups = _GroupsSeen(cache, monkeypatch)
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 12 * CHUNK
        assert torch.equal(_bits(out), _bits(kv))
        assert groups.threads == [threading.get_ident()] * 6 and groups.most == api.PIPELINE_GROUPS
        assert groups.open == 0
        path = cache._local.path_of(cache.namespace, cache.chunk_keys(tokens)[7])
    with open(path, "r+b") as f:
        f.seek(4096 + 100)
        byte = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([byte[0] ^ 0x5A]))
    with _open(cache_dir) as cache:
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 7 * CHUNK
        assert torch.equal(_bits(out[:, :, : 7 * CHUNK]), _bits(kv[:, :, : 7 * CHUNK]))
        assert cache.stats()["local_corrupt"] == 1


def test_groups_of_one_chunk_keep_io_threads_files_in_flight_and_kvikio_reads_go_to_the_pool(cache_dir, monkeypatch):
    """Chunks too large to share a group are still read io_threads at a time on the caller's thread; where the
    backend reads at once (kvikio file by file), the groups go to the read pool instead."""
    from gdscache import api

    kv = make_kv(2, 10 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=9, device="cuda")
    tokens = list(range(kv.shape[2]))
    monkeypatch.setattr(api, "GROUP_BYTES", kv[:, :, :CHUNK].numel() * 2)  # one chunk per group
    with _open(cache_dir) as cache:  # io_threads=4
        assert cache.store(tokens, kv) == 10 * CHUNK
        if not cache._backend.reads_in_background:
            pytest.skip("the backend reads at once here")
        groups = _GroupsSeen(cache, monkeypatch)
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 10 * CHUNK and torch.equal(_bits(out), _bits(kv))
        assert groups.threads == [threading.get_ident()] * 10 and groups.most == 4
        groups.threads.clear()
        cache._backend.native_reads = False  # kvikio reads each group before start returns
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 10 * CHUNK and torch.equal(_bits(out), _bits(kv))
        assert len(groups.threads) == 10 and threading.get_ident() not in groups.threads


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_chunks_decoded_on_io_threads_follow_the_callers_stream(cache_dir, codec):
    # raw and lossless chunks are decoded on the I/O thread that read them: after what the caller queued on
    # ``out`` (a slow fill here), and before the caller's stream goes on
    kv = make_kv(4, 4 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=5, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir, codec=codec) as cache:
        cache.store(tokens, kv)
        for _ in range(2):
            out = torch.empty_like(kv)
            torch.cuda._sleep(200_000_000)  # a few hundred ms of GPU time on the caller's stream
            out.fill_(float("nan"))
            assert cache.retrieve(tokens, out) == kv.shape[2]
            assert torch.equal(_bits(out), _bits(kv))


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_pages_on_the_gpu_through_io_thread_decode(cache_dir, codec):
    from gdscache import KVPages

    kv = make_kv(4, 2 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=6, device="cuda")
    tokens = list(range(kv.shape[2]))
    cache_pages = torch.zeros(4, 2, 40, 16, 2, 64, dtype=torch.bfloat16, device="cuda")  # [L, P, pages, 16, H, D]
    ids = list(range(3, 35))
    KVPages(cache_pages, ids).scatter(kv)
    dest = torch.zeros_like(cache_pages)
    with _open(cache_dir, codec=codec) as cache:
        assert cache.store(tokens, KVPages(cache_pages, ids)) == kv.shape[2]
        assert cache.retrieve(tokens, KVPages(dest, [-1, -1, *ids[2:]])) == kv.shape[2]
    assert torch.equal(_bits(KVPages(dest, ids[2:]).gather()), _bits(kv[:, :, 32:]))
    others = [p for p in range(40) if p not in ids[2:]]
    assert not bool(dest[:, :, others].any())  # the skipped pages and every other page untouched


def test_small_chunks_fetched_in_groups_mix_tiers_and_stop_at_a_miss(cache_dir):
    # 256 KiB chunks: all 40 fetched by one task (one batched read and one checksum sync); the last chunks
    # stored also sit in the DRAM tier, so the group mixes DRAM hits with local reads
    from gdscache import api

    kv = make_kv(4, 40 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=7, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir, cpu_cache_bytes=9 << 20) as cache:  # holds the last 36 chunks stored
        assert cache.store(tokens, kv) == kv.shape[2]
        assert cache._group_size(cache._spec, kv) == api.GROUP_CHUNKS
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == kv.shape[2]
        assert torch.equal(_bits(out), _bits(kv))
        stats = cache.stats()
        assert stats["dram_hits"] > 0 and stats["local_hits"] > 0
        path = cache._local.path_of(cache.namespace, cache.chunk_keys(tokens)[20])
    os.unlink(path)
    with _open(cache_dir) as cache:
        out.fill_(float("nan"))
        assert cache.retrieve(tokens, out) == 20 * CHUNK  # chunk 20 (mid-group) is gone: the prefix ends there
        assert torch.equal(_bits(out[:, :, : 20 * CHUNK]), _bits(kv[:, :, : 20 * CHUNK]))


def test_dram_hits_copy_into_a_strided_gpu_out_while_the_tier_turns_over(cache_dir):
    # raw DRAM hits go from pinned memory straight into ``out`` (no copy staged on the GPU first); every chunk must
    # land whole even when the entries it was copied from are evicted, and their memory reused, at once
    kv = make_kv(4, 8 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=11, device="cuda")  # 512 KiB chunks
    other = make_kv(4, 8 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=12, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir, cpu_cache_bytes=kv.numel() * kv.element_size()) as cache:  # room for these 8 chunks
        assert cache.store(tokens, kv) == kv.shape[2]
        for path in _chunk_files(cache_dir):  # the DRAM tier alone holds them now
            os.unlink(path)
        wide = torch.full((4, 2, kv.shape[2] + 64, 2, 64), float("nan"), dtype=kv.dtype, device="cuda")
        out = wide[:, :, 32 : 32 + kv.shape[2]]
        assert cache.retrieve(tokens, out) == kv.shape[2]
        assert cache.store([t + 1 for t in tokens], other) == kv.shape[2]  # evicts every entry just read
        assert torch.equal(_bits(out), _bits(kv))
        assert torch.isnan(wide[:, :, :32]).all() and torch.isnan(wide[:, :, 32 + kv.shape[2] :]).all()
        stats = cache.stats()
        assert stats["dram_hits"] == 8 and stats["dram_evictions"] >= 8


def test_leading_dram_hits_then_local_reads_fill_one_out(cache_dir):
    # the DRAM tier holds the first 8 chunks of 16 (read back, so promoted, after the last 8 filled it): those are
    # copied on the caller's stream, the rest read from disk by the I/O threads, and the whole request is bit-exact
    kv = make_kv(4, 16 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=13, device="cuda")  # 512 KiB chunks
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir, cpu_cache_bytes=kv.numel() * kv.element_size() // 2) as cache:  # room for 8 chunks
        assert cache.store(tokens, kv) == kv.shape[2]
        half = torch.zeros_like(kv[:, :, : 8 * CHUNK])
        assert cache.retrieve(tokens[: 8 * CHUNK], half) == 8 * CHUNK  # from disk, into the DRAM tier
        before = cache.stats()
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == kv.shape[2]
        assert torch.equal(_bits(out), _bits(kv))
        after = cache.stats()
        assert after["dram_hits"] - before.get("dram_hits", 0) == 8
        assert after["local_hits"] - before["local_hits"] == 8


def test_group_from_the_remote_tier_into_the_gpu(cache_dir, tmp_path):
    # a fresh local tier: every chunk of the group comes from the remote tier (fetched in parallel), up to the
    # first one it lacks
    pytest.importorskip("fsspec")
    from gdscache.tiers.remote import object_key

    url = f"memory://gdscache-gpu-group-{os.getpid()}"
    kv = make_kv(4, 24 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=8, device="cuda")
    tokens = list(range(kv.shape[2]))
    with _open(cache_dir, remote_url=url, remote_write="through") as cache:
        assert cache.store(tokens, kv) == kv.shape[2]
        missing = object_key(cache.namespace, cache.chunk_keys(tokens)[17])
    with _open(str(tmp_path / "fresh"), remote_url=url) as cache:
        out = torch.full_like(kv, float("nan"))
        cache._remote.store.delete(missing)
        assert cache.retrieve(tokens, out) == 17 * CHUNK
        assert torch.equal(_bits(out[:, :, : 17 * CHUNK]), _bits(kv[:, :, : 17 * CHUNK]))
        assert cache.stats()["remote_hits"] >= 17


def test_raw_chunks_of_one_request_are_encoded_with_one_copy():
    from gdscache.codecs import get_codec
    from gdscache.pages import token_slice

    kv = make_kv(4, 5 * CHUNK, 2, 64, dtype=torch.bfloat16, seed=5, device="cuda")
    chunks = [token_slice(kv, k * CHUNK, (k + 1) * CHUNK) for k in range(5)]
    codec = get_codec("raw")
    batched = codec.encode_many(chunks)
    assert len({p.untyped_storage().data_ptr() for p in batched}) == 1  # slices of one new buffer
    assert batched[0].untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    for payload, chunk in zip(batched, chunks, strict=True):
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert torch.equal(payload, codec.encode(chunk))


def test_a_gpu_store_checksums_while_its_files_are_written(cache_dir, monkeypatch):
    """A 16-chunk store through the GPU backend encodes every chunk at once, starts writing their files, then
    checksums the payloads and publishes the files with their headers, from the caller's thread: bit-exact."""
    from gdscache import api

    kv = make_kv(2, 16 * CHUNK, 1, 64, dtype=torch.bfloat16, seed=6, device="cuda")
    tokens = list(range(kv.shape[2]))
    calls = []
    with _open(cache_dir) as cache:
        encode_many, start_many, digests = cache._codec.encode_many, cache._local.start_many, api.digests

        def spy_encode(chunks):
            calls.append(("encode", len(chunks)))
            return encode_many(chunks)

        def spy_start(namespace, chunks):
            calls.append(("start", len(chunks)))
            return start_many(namespace, chunks)

        def spy_digests(payloads, algorithms):
            calls.append(("checksum", len(payloads)))
            return digests(payloads, algorithms)

        cache._codec.encode_many, cache._local.start_many = spy_encode, spy_start
        monkeypatch.setattr(api, "digests", spy_digests)
        submit, cache._backend.submit = cache._backend.submit, lambda *_: pytest.fail("a GPU store needs no I/O thread")
        assert cache.store(tokens, kv) == 16 * CHUNK
        cache._backend.submit = submit
        assert calls == [("encode", 16), ("start", 16), ("checksum", 16)]
        assert len(_chunk_files(cache_dir)) == 16
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 16 * CHUNK
        assert torch.equal(_bits(out), _bits(kv))


def test_a_store_on_the_callers_stream_waits_for_its_work(cache_dir):
    """A store from the caller's own stream writes the KV that stream computes: encode, checksums and the I/O
    threads' writes come after the work queued there (a slow kernel, then the KV's copy here)."""
    kv = make_kv(2, 16 * CHUNK, 1, 64, dtype=torch.bfloat16, seed=8, device="cuda")
    tokens = list(range(kv.shape[2]))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # ``kv`` is there
    with _open(cache_dir) as cache, torch.cuda.stream(side):
        src = torch.zeros_like(kv)
        torch.cuda._sleep(200_000_000)  # a few hundred ms of GPU time before the KV is there
        src.copy_(kv)
        assert cache.store(tokens, src) == 16 * CHUNK
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 16 * CHUNK
        side.synchronize()
        assert torch.equal(_bits(out), _bits(kv))


def _hold_publishing(cache: GDSCache) -> threading.Event:
    """Make the cache's write-behind publishing wait until the returned event is set."""
    release, publish = threading.Event(), cache._publish

    def held_publish(writing, metas, payloads):
        release.wait(60)
        return publish(writing, metas, payloads)

    cache._publish = held_publish
    return release


def test_async_gpu_store_publishes_behind_and_frees_the_kv_at_once(cache_dir):
    """In async mode a GPU store hands its group's publishing to a write-behind thread: it returns with the KV
    already copied out (the caller overwrites it at once, from another stream than the store's, whose encode a
    slow kernel delays), the chunks count and read back while in flight (held there by a publish that cannot
    finish yet), and after flush() a fresh cache reads the stored KV bit-exact."""
    kv = make_kv(2, 16 * CHUNK, 1, 64, dtype=torch.bfloat16, seed=9, device="cuda")
    want = kv.clone()
    tokens = list(range(kv.shape[2]))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with _open(cache_dir, write_mode="async", write_queue_depth=16) as cache:
        release = _hold_publishing(cache)
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # the store's encode queues behind a few hundred ms of GPU time
            assert cache.store(tokens, kv) == 16 * CHUNK
        kv.fill_(0)  # on the default stream, not ordered after ``side``: the caller's buffer is free already
        assert cache.stats()["write_queue_depth"] == 16 and not _chunk_files(cache_dir)
        assert cache.lookup(tokens) == 16 * CHUNK
        out = torch.full_like(kv, float("nan"))
        assert cache.retrieve(tokens, out) == 16 * CHUNK  # from the payloads in flight
        assert torch.equal(_bits(out), _bits(want))
        release.set()
        cache.flush()
        assert cache.stats()["write_queue_depth"] == 0 and len(_chunk_files(cache_dir)) == 16
        assert cache.stats()["chunks_written"] == 16
    with _open(cache_dir) as fresh:
        out = torch.full_like(want, float("nan"))
        assert fresh.retrieve(tokens, out) == 16 * CHUNK
        assert torch.equal(_bits(out), _bits(want))


def test_async_gpu_stores_wait_for_room_but_not_for_their_own_writes(cache_dir):
    """With room for one group, the second store's files are started before it waits for the first group's
    publishing; every chunk of both is then stored bit-exact."""
    kv = make_kv(2, 8 * CHUNK, 1, 64, dtype=torch.bfloat16, seed=10, device="cuda")
    first, second = list(range(kv.shape[2])), list(range(10**6, 10**6 + kv.shape[2]))
    with _open(cache_dir, write_mode="async", write_queue_depth=8) as cache:
        release, start_many, started = _hold_publishing(cache), cache._local.start_many, []

        def spy_start(namespace, chunks):
            started.append(len(chunks))
            return start_many(namespace, chunks)

        cache._local.start_many = spy_start
        assert cache.store(first, kv) == 8 * CHUNK
        returned = []
        second_store = threading.Thread(target=lambda: returned.append(cache.store(second, kv)))
        second_store.start()
        deadline = time.monotonic() + 60
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        second_store.join(0.5)
        assert second_store.is_alive() and started == [8, 8]  # its writes are under way, it waits for room
        release.set()
        second_store.join(60)
        assert returned == [8 * CHUNK]
        cache.flush()
        assert len(_chunk_files(cache_dir)) == 16
        for tokens in (first, second):
            out = torch.full_like(kv, float("nan"))
            assert cache.retrieve(tokens, out) == 8 * CHUNK and torch.equal(_bits(out), _bits(kv))
