"""Restart, crash and sharing across real processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import torch
from kv_worker import CHUNK, kv_for, prompt
from kvtestlib import PYTHON, REPO, make_kv, python_env

from gdscache import GDSCache

WORKER = os.path.join(REPO, "tests", "kv_worker.py")
ROUNDS = 10  # of the 4-process test: each worker stores and retrieves 6 overlapping prompts per round


def _run_child(code: str, **env: str) -> str:
    done = subprocess.run([PYTHON, "-c", code], env=python_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_keys_identical_across_interpreters_with_different_hash_seeds():
    code = (
        "from gdscache import GDSCache, KVSpec; import torch, tempfile\n"
        "c = GDSCache(path=tempfile.mkdtemp(), chunk_size=4, model_id='m', "
        "kv_shape={'num_layers': 2, 'num_kv_heads': 1, 'head_dim': 4, 'dtype': 'float16'})\n"
        "print(','.join(k.hex() for k in c.chunk_keys(list(range(12)))))"
    )
    a = _run_child(code, PYTHONHASHSEED="1")
    b = _run_child(code, PYTHONHASHSEED="12345")
    assert a == b and len(a.strip().split(",")) == 3


def test_persistence_across_restart_in_a_new_process(cache_dir):
    kv = make_kv(3, 64, 2, 16, dtype=torch.bfloat16, seed=3)
    torch.save(kv, os.path.join(cache_dir, "..", "kv.pt"))
    code = (
        "import torch, sys; from gdscache import GDSCache\n"
        f"kv = torch.load({os.path.join(cache_dir, '..', 'kv.pt')!r})\n"
        f"c = GDSCache(path={cache_dir!r}, chunk_size=16, model_id='m'); print(c.store(list(range(64)), kv)); c.close()"
    )
    assert _run_child(code).strip() == "64"
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(list(range(64)), out) == 64
        assert torch.equal(out, kv)
        assert cache.stats()["local_chunks"] == 4


def test_restart_ignores_temp_leftovers_and_honours_quota(cache_dir):
    kv = make_kv(2, 160, 2, 8)  # 10 chunks of 4 KiB payload = 8 KiB on disk each
    tokens = list(range(160))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        keys = cache.chunk_keys(tokens)
        paths = [cache._local.path_of(cache.namespace, k) for k in keys]
    for i, path in enumerate(paths):  # chunk i last used at t0 + i
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    host = os.uname().nodename.replace(".", "_")
    dead_temp = os.path.join(os.path.dirname(paths[0]), f".{os.path.basename(paths[0])}.{host}.999999999.abcd.tmp")
    open(dead_temp, "wb").write(b"half a chunk")
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", max_disk_bytes=5 * 8192) as cache:
        assert not os.path.exists(dead_temp)
        stats = cache.stats()
        assert stats["local_chunks"] == 5 and stats["local_bytes"] <= 5 * 8192
        assert [os.path.exists(p) for p in paths] == [False] * 5 + [True] * 5  # least recently used went first


def _temp_files(root: str) -> list[str]:
    return [f for _, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


def test_sigkill_writer_at_random_points_leaves_exact_or_missing_chunks(cache_dir):
    rng = random.Random(1234)
    last_printed = -1
    killed_mid_write = 0
    for _ in range(20):
        proc = subprocess.Popen([PYTHON, WORKER, "store-forever", cache_dir], env=python_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # imported and wrote at least one prompt
        assert first.strip().isdigit(), proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        printed = [int(line) for line in [first, *proc.stdout.read().splitlines()] if line.strip()]
        last_printed = max(last_printed, *printed)
        # the next writer's start-up removes a dead writer's temporary files: count them now
        killed_mid_write += bool(_temp_files(cache_dir))
    assert killed_mid_write >= 1, "no kill landed during a write: the test did not test a crash mid-write"
    with GDSCache(path=cache_dir, chunk_size=CHUNK, model_id="worker") as cache:
        hits = 0
        for i in range(last_printed + 3):  # every prompt a writer finished, and the ones in flight when it died
            toks = prompt(i, 4)
            ref = kv_for(toks)
            out = torch.zeros_like(ref)
            n = cache.retrieve(toks, out)
            assert torch.equal(out[:, :, :n], ref[:, :, :n]), f"prompt {i}: wrong KV after a crash"
            if i <= last_printed:
                assert n == len(toks), f"prompt {i} was stored (its writer said so) but reads back {n} tokens"
            hits += n
        assert hits > 0 and cache.stats()["local_corrupt"] == 0
    assert _temp_files(cache_dir) == []  # the restart scan removed the dead writers' temporary files


def test_four_processes_share_one_path(cache_dir, tmp_path):
    """Four processes store and retrieve the same prompts at once (every round starts together at a file barrier)."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen([PYTHON, WORKER, "mixed", cache_dir, "{}", str(ROUNDS), str(barrier), "4"], env=python_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["bad"] == 0 for r in results)
    assert all(r["hits"] == ROUNDS * 6 * 3 * CHUNK for r in results)  # every retrieve after its own store is a full hit
    with GDSCache(path=cache_dir, chunk_size=CHUNK, model_id="worker") as cache:
        for i in range(6):
            toks = prompt(i, 3)
            out = torch.zeros(2, 2, len(toks), 2, 8, dtype=torch.bfloat16)
            assert cache.retrieve(toks, out) == len(toks) and torch.equal(out, kv_for(toks))
