"""GDSCache with the S3 tier on SeaweedFS: sharing across processes, read-through, outages at the API level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gdscache import GDSCache

pytestmark = pytest.mark.s3

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 16
N_TOKENS = 8 * CHUNK

# A child process: store (A) or retrieve and verify (B) the same deterministic KV through one bucket.
CHILD = r"""
import json, sys, torch
from gdscache import GDSCache
args = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(1234)
kv = torch.randn(2, 2, args["tokens"], 2, 8, generator=g).to(torch.bfloat16)
tokens = list(range(1000, 1000 + args["tokens"]))
cache = GDSCache(path=args["path"], chunk_size=args["chunk"], model_id="shared-model", storage="posix",
                 kv_shape={"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"},
                 remote_url=args["url"], remote_options=args["options"], remote_write=args["write"])
if args["mode"] == "store":
    result = {"stored": cache.store(tokens, kv)}
else:
    out = torch.zeros_like(kv)
    looked = cache.lookup(tokens)
    n = cache.retrieve(tokens, out)
    result = {"lookup": looked, "retrieved": n, "equal": bool(torch.equal(out[:, :, :n], kv[:, :, :n]))}
cache.close()
result["stats"] = {k: v for k, v in cache.stats().items() if k.startswith(("remote_", "local_"))}
print(json.dumps(result))
"""


def _child(mode: str, path: str, url: str, options: dict, write: str = "behind") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDSCACHE_", "AWS_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    args = json.dumps({"mode": mode, "path": path, "url": url, "options": options, "write": write,
                       "chunk": CHUNK, "tokens": N_TOKENS})
    done = subprocess.run([sys.executable, "-c", CHILD, args], check=False, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("write", ["through", "behind"])
def test_two_processes_share_one_bucket(seaweed, bucket, tmp_path, write):
    url, options = f"s3://{bucket}/kv", seaweed.options()
    a = _child("store", str(tmp_path / "local-a"), url, options, write)
    assert a["stored"] == N_TOKENS
    assert a["stats"]["remote_puts"] == N_TOKENS // CHUNK and a["stats"]["remote_errors"] == 0

    b = _child("retrieve", str(tmp_path / "local-b"), url, options)
    assert (b["lookup"], b["retrieved"], b["equal"]) == (N_TOKENS, N_TOKENS, True)
    assert b["stats"]["remote_hits"] == N_TOKENS // CHUNK and b["stats"]["local_reads"] == 0

    again = _child("retrieve", str(tmp_path / "local-b"), url, options)  # read-through filled B's local tier
    assert again["retrieved"] == N_TOKENS and again["equal"]
    assert again["stats"]["remote_gets"] == 0


def _cache(path, seaweed, bucket, timeout_s: float = 10.0, **extra) -> GDSCache:
    """Generous deadlines unless a test is about deadlines: a busy 2-core host can stall a request for seconds."""
    return GDSCache(path=str(path), chunk_size=CHUNK, model_id="m", storage="posix", remote_url=f"s3://{bucket}/kv",
                    remote_options=seaweed.options(), remote_write="through", remote_timeout_s=timeout_s, **extra)


def test_round_trip_through_s3_with_tiny_and_empty_local_tiers(seaweed, bucket, tmp_path):
    kv = torch.randn(2, 2, N_TOKENS, 2, 8)
    tokens = list(range(N_TOKENS))
    chunk_bytes = kv[:, :, :CHUNK].numel() * 4 + 4096
    with _cache(tmp_path / "a", seaweed, bucket, max_disk_bytes=chunk_bytes) as cache:  # local keeps ~1 chunk
        assert cache.store(tokens, kv) == N_TOKENS
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == N_TOKENS and torch.equal(out, kv)
        assert cache.stats()["remote_hits"] >= 1
    with _cache(tmp_path / "empty", seaweed, bucket) as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == N_TOKENS and torch.equal(out, kv)
        assert cache.stats()["remote_hits"] == N_TOKENS // CHUNK


def test_outage_during_a_run_keeps_store_and_retrieve_going(seaweed, bucket, tmp_path):
    kv = torch.randn(2, 2, N_TOKENS, 2, 8)
    tokens = list(range(N_TOKENS))
    with _cache(tmp_path / "writer", seaweed, bucket) as writer:
        writer.store(tokens, kv)
        assert writer.stats()["remote_puts"] == N_TOKENS // CHUNK
    reader = _cache(tmp_path / "reader", seaweed, bucket, timeout_s=1.0)
    try:
        assert reader.stats()["remote_healthy"]
        seaweed.kill()
        out = torch.zeros_like(kv)
        started = time.monotonic()
        assert reader.retrieve(tokens, out) == 0  # only the store had it: a miss, not an exception
        other = [t + 50_000 for t in tokens]
        assert reader.store(other, kv) == N_TOKENS  # the local tier still takes writes
        assert reader.retrieve(other, out) == N_TOKENS and torch.equal(out, kv)
        assert time.monotonic() - started < 15  # bounded by deadlines and the breaker, not by retries forever
        assert reader.stats()["remote_healthy"] is False

        seaweed.start()
        deadline = time.monotonic() + 20
        while not reader.stats()["remote_healthy"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reader.retrieve(tokens, out) == N_TOKENS and torch.equal(out, kv)
    finally:
        seaweed.ensure_running()
        reader.close()


def test_prefetch_warms_a_prefix_from_the_bucket(seaweed, bucket, tmp_path):
    url, options = f"s3://{bucket}/kv", seaweed.options()
    assert _child("store", str(tmp_path / "writer"), url, options, "through")["stored"] == N_TOKENS
    g = torch.Generator().manual_seed(1234)
    kv = torch.randn(2, 2, N_TOKENS, 2, 8, generator=g).to(torch.bfloat16)
    tokens = list(range(1000, 1000 + N_TOKENS))
    shape = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"}
    local = tmp_path / "reader"
    with GDSCache(path=str(local), chunk_size=CHUNK, model_id="shared-model", storage="posix", kv_shape=shape,
                  remote_url=url, remote_options=options, cpu_cache_bytes="1MiB") as cache:
        assert cache.prefetch(tokens[: 5 * CHUNK + 3]).result(timeout=60) == 5 * CHUNK
        files = [f for _, _, fs in os.walk(local) for f in fs if f.endswith(".gdc")]
        assert len(files) == 5  # fetched, verified and written locally; nothing beyond the prefix asked for
        assert cache.stats()["dram_chunks"] == 5
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == N_TOKENS and torch.equal(out, kv)
        assert cache.stats()["dram_hits"] == 5
