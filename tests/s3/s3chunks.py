"""Test chunks: a header and a random payload, as the codec would produce them."""

from __future__ import annotations

import os

import torch

from gdscache.format.chunkfile import ChunkMeta, make_meta
from gdscache.spec import KVSpec
from gdscache.tiers.remote import RemoteTier

SPEC = KVSpec(num_layers=2, kv_planes=2, num_kv_heads=2, head_dim=64, dtype=torch.float16)
NAMESPACE = bytes.fromhex("00112233445566778899aabbccddeeff")


def make_chunk(nbytes: int, seed: int, namespace: bytes = NAMESPACE) -> tuple[bytes, ChunkMeta, torch.Tensor]:
    """``(key, meta, payload)`` with ``nbytes`` of seeded random payload."""
    gen = torch.Generator().manual_seed(seed)
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    key = seed.to_bytes(4, "little") + os.urandom(12)
    meta = make_meta(key, namespace, SPEC, 16, "raw", {}, payload)
    return key, meta, payload


def put_all(tier: RemoteTier, sizes: list[int]) -> list[tuple[bytes, ChunkMeta, torch.Tensor]]:
    """Store the namespace info and one chunk of each size (seeded by position) through ``tier``, then flush."""
    chunks = [make_chunk(n, seed) for seed, n in enumerate(sizes)]
    tier.put_namespace_info(NAMESPACE, {"model_id": "m"})
    for key, meta, payload in chunks:
        tier.put(NAMESPACE, key, meta, payload)
    tier.flush()
    return chunks
