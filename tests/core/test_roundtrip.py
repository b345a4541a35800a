"""Round trips, prefixes and namespaces through real files on disk (POSIX path)."""

from __future__ import annotations

import pytest
import torch
from kvtestlib import make_kv

from gdscache import GDSCache

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 16), (2, 3, 1, 576)], ids=["tiny", "odd", "mla-like"])
def test_bitwise_round_trip(cache_dir, dtype, shape):
    layers, chunk, heads, dim = shape
    planes = 1 if dim == 576 else 2
    tokens = list(range(100, 100 + 3 * chunk + chunk // 2))  # three whole chunks and maybe a partial one
    kv = make_kv(layers, len(tokens), heads, dim, planes=planes, dtype=dtype, seed=1)
    with GDSCache(path=cache_dir, chunk_size=chunk, model_id="m", storage="posix") as cache:
        assert cache.store(tokens, kv) == 3 * chunk
        assert cache.store(tokens, kv) == 0  # duplicates are skipped
        assert cache.lookup(tokens) == 3 * chunk
        out = torch.full_like(kv, float("nan")) if dtype.itemsize > 1 else torch.empty_like(kv)
        assert cache.retrieve(tokens, out) == 3 * chunk
        assert torch.equal(out[:, :, : 3 * chunk].view(torch.uint8), kv[:, :, : 3 * chunk].view(torch.uint8))


def test_retrieve_into_larger_strided_out(cache_dir):
    kv = make_kv(2, 32, 2, 8)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=8, model_id="m") as cache:
        cache.store(tokens, kv)
        big = torch.full((2, 2, 40, 2, 8), 7.0)
        assert cache.retrieve(tokens, big) == 32
        assert torch.equal(big[:, :, :32], kv)
        assert torch.all(big[:, :, 32:] == 7.0)  # nothing past n_read is written


def test_hit_stops_at_first_missing_chunk(cache_dir):
    kv = make_kv(2, 64, 2, 8)
    tokens = list(range(64))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens[:32], kv[:, :, :32])
        assert cache.lookup(tokens) == 32
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 32
        assert torch.equal(out[:, :, :32], kv[:, :, :32])


def test_a_request_of_one_read_task_runs_it_on_the_callers_thread(cache_dir, monkeypatch):
    """A retrieve whose chunks make one I/O task reads them on the caller's thread (no hop to a pool thread and
    back); several tasks go to the pool (on the CPU; into a GPU they all run on the caller's thread:
    tests/gpu/test_gds_cache_gpu.py). An error raised by the task reaches the caller either way."""
    import threading

    kv = make_kv(2, 24, 2, 8)
    tokens = list(range(24))
    with GDSCache(path=cache_dir, chunk_size=8, model_id="m") as cache:  # on the CPU, a task per chunk
        assert cache.store(tokens, kv) == 24
        real, threads = cache._start_fetch_group, []

        def fetch_group(*args):
            threads.append(threading.get_ident())
            return real(*args)

        monkeypatch.setattr(cache, "_start_fetch_group", fetch_group)
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens[:8], out) == 8
        assert threads == [threading.get_ident()]
        threads.clear()
        assert cache.retrieve(tokens, out) == 24
        assert len(threads) == 3 and threading.get_ident() not in threads
        assert torch.equal(out, kv)

        def broken(*args):
            raise RuntimeError("task failed")

        monkeypatch.setattr(cache, "_start_fetch_group", broken)
        for n in (8, 24):
            with pytest.raises(RuntimeError, match="task failed"):
                cache.retrieve(tokens[:n], out)


def test_an_interrupted_drain_still_ends_every_task(cache_dir):
    """Tasks begun on the caller's thread hold files and pinned keys until ended: _drain ends each of them even when
    one is interrupted (KeyboardInterrupt), and raises that once they all have ended."""
    from gdscache.api import _Started

    ended = []

    def start(name, error=None):
        def end():
            ended.append(name)
            if error is not None:
                raise error
            return []

        return end

    with GDSCache(path=cache_dir, chunk_size=8, model_id="m") as cache:
        jobs = [_Started(start, "a", KeyboardInterrupt()), _Started(start, "b"), _Started(start, "c", OSError("x"))]
        with pytest.raises(KeyboardInterrupt):
            cache._drain(jobs, lambda job: job.result(), recycle=False)
        assert ended == ["a", "b", "c"]


def test_a_retrieve_does_not_queue_behind_a_stores_tasks(cache_dir):
    """Reads have a pool of their own: with every write worker busy (a large store on a saver thread), a retrieve of
    several tasks still completes."""
    import threading

    kv = make_kv(2, 24, 2, 8)
    tokens = list(range(24))
    with GDSCache(path=cache_dir, chunk_size=8, model_id="m", io_threads=2) as cache:  # on the CPU, a task per chunk
        assert cache.store(tokens, kv) == 24
        held = threading.Event()
        busy = [cache._backend.submit(held.wait) for _ in range(4)]  # both write workers, and two queued behind
        out, got = torch.zeros_like(kv), []
        reader = threading.Thread(target=lambda: got.append(cache.retrieve(tokens, out)))
        reader.start()
        reader.join(timeout=60)  # a hang, not a time: the old shared pool never ran the reads while held
        finished = not reader.is_alive()
        held.set()
        reader.join()
        for job in busy:
            job.result()
    assert finished, "the retrieve waited for the write pool"
    assert got == [24] and torch.equal(out, kv)


def test_reads_under_inference_mode_leave_pooled_buffers_writable(cache_dir):
    """An engine retrieves under ``torch.inference_mode()`` (vLLM's model runner), and a one-task request is read on
    its thread: the host buffers it takes from the shared pool must stay ordinary tensors, or the next read or store
    on another thread could not write into them."""
    import threading

    torch.manual_seed(0)
    kv = torch.randn(2, 2, 128, 4, 64, dtype=torch.float16)
    other = torch.randn(2, 2, 64, 4, 64, dtype=torch.float16)
    with GDSCache(path=cache_dir, chunk_size=64, model_id="m", codec="lossless") as cache:
        assert cache.store(list(range(128)), kv) == 128
    with GDSCache(path=cache_dir, chunk_size=64, model_id="m", codec="lossless",
                  cpu_cache_bytes=1 << 30) as cache:  # a fresh process: nothing pooled yet; DRAM copies made too
        out = torch.zeros_like(kv)
        for n in (64, 128):
            with torch.inference_mode():
                assert cache.retrieve(list(range(n)), out) == n
        assert torch.equal(out, kv)
        stored: list[int] = []
        saver = threading.Thread(target=lambda: stored.append(cache.store(list(range(1000, 1064)), other)))
        saver.start()
        saver.join()
        assert stored == [64]
        assert cache.stats()["local_write_errors"] == 0


@pytest.mark.parametrize("changed_chunk", [0, 1, 2, 3])
def test_changed_token_invalidates_its_chunk_and_all_later(cache_dir, changed_chunk):
    kv = make_kv(2, 64, 2, 8)
    tokens = list(range(1000, 1064))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        edited = list(tokens)
        edited[changed_chunk * 16 + 5] += 1
        assert cache.lookup(edited) == changed_chunk * 16
        out = torch.zeros_like(kv)
        assert cache.retrieve(edited, out) == changed_chunk * 16


def test_models_and_settings_never_share_chunks(cache_dir):
    kv = make_kv(2, 32, 2, 8)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="model-a") as a:
        assert a.store(tokens, kv) == 32
    others = [
        dict(model_id="model-b"),
        dict(model_id="model-a", tp_rank=1, tp_size=2),
        dict(model_id="model-a", layout="other-layout"),
    ]
    for fields in others:
        with GDSCache(path=cache_dir, chunk_size=16, **fields) as b:
            out = torch.zeros_like(kv)
            assert b.retrieve(tokens, out) == 0
            assert b.lookup(tokens) == 0
    with GDSCache(path=cache_dir, chunk_size=16, model_id="model-a") as a16:
        out16 = torch.zeros(2, 2, 32, 2, 8, dtype=torch.float16)
        assert a16.retrieve(tokens, out16) == 0  # another dtype is another namespace
    with GDSCache(path=cache_dir, chunk_size=16, model_id="model-a") as again:
        out = torch.zeros_like(kv)
        assert again.retrieve(tokens, out) == 32 and torch.equal(out, kv)


def test_lookup_with_configured_kv_shape(cache_dir):
    kv = make_kv(2, 32, 2, 8, dtype=torch.bfloat16)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as writer:
        writer.store(tokens, kv)
    shape = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"}
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", kv_shape=shape) as scheduler:
        assert scheduler.lookup(tokens) == 32
        assert scheduler.lookup(tokens[:31]) == 16


def test_lookup_without_spec_is_a_clear_error(cache_dir):
    with GDSCache(path=cache_dir, chunk_size=16) as cache:
        with pytest.raises(RuntimeError, match="kv_shape"):
            cache.lookup([1, 2, 3])


def test_async_write_behind_serves_pending_and_flushes(cache_dir):
    kv = make_kv(2, 128, 2, 8)
    tokens = list(range(128))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", write_mode="async", write_queue_depth=2) as cache:
        assert cache.store(tokens, kv) == 128
        assert cache.lookup(tokens) == 128  # pending chunks count as present
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 128 and torch.equal(out, kv)
        cache.flush()
        assert cache.stats()["chunks_written"] == 8
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as fresh:
        out = torch.zeros_like(kv)
        assert fresh.retrieve(tokens, out) == 128 and torch.equal(out, kv)


def test_dram_tier_serves_hits_after_files_vanish(cache_dir, tmp_path):
    import shutil

    kv = make_kv(2, 64, 2, 8)
    tokens = list(range(64))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", cpu_cache_bytes="1MiB") as cache:
        cache.store(tokens, kv)
        for entry in (tmp_path / "kv").iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 64 and torch.equal(out, kv)
        assert cache.stats()["dram_hits"] == 4


def test_dram_tier_respects_its_quota(cache_dir):
    kv = make_kv(2, 64, 2, 8)  # 2*2*16*2*8 values * 4 bytes = 4 KiB per chunk
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", cpu_cache_bytes=9000) as cache:
        cache.store(list(range(64)), kv)
        stats = cache.stats()
        assert stats["dram_bytes"] <= 9000 and stats["dram_chunks"] == 2 and stats["dram_evictions"] == 2


def test_dram_tier_hands_over_the_leading_run_of_keys_it_holds():
    from gdscache.tiers.dram import DramTier

    tier = DramTier(3 * 16)
    metas = {key: object() for key in (b"a", b"b", b"c", b"d")}
    for key in (b"a", b"b", b"d"):
        tier.put(key, metas[key], torch.full((16,), key[0], dtype=torch.uint8))
    got = tier.get_many([b"a", b"b", b"c", b"d"])  # stops at the first key not held
    assert [meta for meta, _ in got] == [metas[b"a"], metas[b"b"]]
    assert [int(payload[0]) for _, payload in got] == [ord("a"), ord("b")]
    assert tier.get_many([b"c", b"a"]) == []
    tier.put(b"c", metas[b"c"], torch.zeros(16, dtype=torch.uint8))  # evicts the least recently used: d, not a or b
    assert b"d" not in tier and all(key in tier for key in (b"a", b"b", b"c"))
