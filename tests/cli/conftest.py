"""A cache directory with real chunk files written through GDSCache."""

from __future__ import annotations

import pytest
import torch

from gdscache import GDSCache

CHUNK = 16


def kv_for(tokens: int, layers: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, tokens, 2, 8, generator=gen).to(torch.bfloat16)


@pytest.fixture
def model_a():
    """The prompt and KV that ``populated`` stored for model-a."""
    return list(range(4 * CHUNK)), kv_for(4 * CHUNK)


@pytest.fixture
def populated(tmp_path):
    """Two models in one directory: model-a with 4 chunks (one prompt), model-b with 2 chunks."""
    root = tmp_path / "kv"
    with GDSCache(path=str(root), chunk_size=CHUNK, model_id="model-a", storage="posix") as cache:
        assert cache.store(list(range(4 * CHUNK)), kv_for(4 * CHUNK)) == 4 * CHUNK
    with GDSCache(path=str(root), chunk_size=CHUNK, model_id="model-b", storage="posix") as cache:
        assert cache.store(list(range(100, 100 + 2 * CHUNK)), kv_for(2 * CHUNK, seed=1)) == 2 * CHUNK
    return root
