"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kvtestlib import make_kv

from gdscache import Config, GDSCache


@pytest.fixture
def cache(cache_dir):
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as c:
        yield c


@pytest.mark.parametrize(
    "kv, error, match",
    [
        (torch.randn(2, 2, 32, 8), ValueError, "5 dims"),
        (torch.randn(2, 3, 32, 2, 8), ValueError, "kv_planes must be 2"),
        (torch.randint(0, 5, (2, 2, 32, 2, 8)), TypeError, "floating"),
        (torch.randn(2, 2, 32, 2, 8, dtype=torch.float64), TypeError, "unsupported KV dtype"),
        (torch.randn(2, 2, 16, 2, 8), ValueError, "kv holds 16 tokens but tokens has 32"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_kv(cache, kv, error, match):
    with pytest.raises(error, match=match):
        cache.store(list(range(32)), kv)


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        ([[1, 2], [3, 4]], TypeError, "ints"),
        (np.zeros((2, 16), dtype=np.int64), ValueError, "1-D"),
        (torch.zeros(32), TypeError, "integers"),
        ([1.5] * 32, TypeError, "ints"),
        ([-1] * 32, ValueError, ">= 0"),
        ([1, True] * 16, TypeError, "found True"),
        ([0] * 31 + [2**63], ValueError, r"below 2\*\*32"),
        ([0] * 31 + [2**32], ValueError, r"below 2\*\*32, found 4294967296"),
        (np.full(32, 2**63, dtype=np.uint64), ValueError, r"below 2\*\*32, found 9223372036854775808"),
        (torch.full((32,), 2**32), ValueError, r"below 2\*\*32, found 4294967296"),
        ("hello", TypeError, "list, numpy array or torch tensor"),
        (np.arange(32, dtype=np.float32), TypeError, "integers"),
    ],
)
def test_bad_tokens(cache, tokens, error, match):
    with pytest.raises(error, match=match):
        cache.store(tokens, make_kv(2, 32, 2, 8))


def test_tokens_accept_lists_arrays_and_tensors(cache):
    kv = make_kv(2, 32, 2, 8)
    assert cache.store(np.arange(32, dtype=np.int32), kv) == 32
    assert cache.lookup(torch.arange(32)) == 32
    assert cache.lookup(list(range(32))) == 32
    assert cache.lookup(tuple(range(32))) == cache.lookup(range(32)) == 32
    assert cache.lookup([np.int64(t) for t in range(32)]) == 32
    keys = cache.chunk_keys(np.arange(32, dtype=np.uint16))
    assert len(keys) == 32 // cache.config.chunk_size > 0
    assert keys == cache.chunk_keys(list(range(32))) == cache.chunk_keys(torch.arange(32, dtype=torch.int32))


def test_out_too_small_or_mismatched(cache):
    kv = make_kv(2, 32, 2, 8)
    cache.store(list(range(32)), kv)
    with pytest.raises(ValueError, match="out holds 16 tokens but tokens has 32"):
        cache.retrieve(list(range(32)), torch.zeros(2, 2, 16, 2, 8))
    with pytest.raises(ValueError, match=r"^out does not match this cache's KV: .*heads=2.*got .*, 4, 8\]"):
        cache.retrieve(list(range(32)), torch.zeros(2, 2, 32, 4, 8))
    with pytest.raises(ValueError, match="^out does not match.*bfloat16"):
        cache.retrieve(list(range(32)), torch.zeros(2, 2, 32, 2, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "out, error, match",
    [
        (torch.zeros(2, 2, 32, 16), ValueError, "^out must have 5 dims"),
        (torch.zeros(2, 2, 32, 2, 8, dtype=torch.int32), TypeError, "^out must be a floating tensor, got dtype torch.int32"),
        (np.zeros((2, 2, 32, 2, 8), dtype=np.float32), TypeError, "^out must be a torch.Tensor or gdscache.KVPages"),
    ],
)
def test_bad_out_is_named_out(cache, out, error, match):
    cache.store(list(range(32)), make_kv(2, 32, 2, 8))
    with pytest.raises(error, match=match):
        cache.retrieve(list(range(32)), out)


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable directory"):
        GDSCache(path=str(blocker / "kv"))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not a writable directory"):
            GDSCache(path=str(ro))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"path": "/tmp/x", "chunk_sise": 4}, "unknown config key 'chunk_sise'"),
        ({"path": "/tmp/x", "chunk_size": 0}, "chunk_size"),
        ({"path": "/tmp/x", "storage": "nfs"}, "storage"),
        ({"path": "/tmp/x", "max_disk_bytes": "ten gigs"}, "cannot parse size"),
        ({"path": "/tmp/x", "tp_rank": 2, "tp_size": 2}, "tp_rank 2 must be < tp_size 2"),
        ({"path": "/tmp/x", "write_mode": "later"}, "write_mode"),
        ({}, "path"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        Config.build(fields)


def test_unknown_codec_lists_the_known_ones(cache_dir):
    with pytest.raises(ValueError, match="unknown codec 'zip'.*raw"):
        GDSCache(path=cache_dir, codec="zip")


def test_closed_cache_refuses_work(cache_dir):
    cache = GDSCache(path=cache_dir, chunk_size=16)
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        cache.store(list(range(16)), make_kv(2, 16, 2, 8))
