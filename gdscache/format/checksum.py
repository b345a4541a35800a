"""Payload checksums, computed where the payload lives.

Two algorithms, named in every chunk header:

- ``xxh3_64``: xxHash3 of the bytes; fast on the CPU, used for payloads in host memory.
- ``halfsum3``: three position-weighted sums over the payload's 16-bit little-endian words
  (weights ``i mod 65521 + 1`` and ``i mod 65519 + 1``), all in int64 without overflow for
  payloads below 4 GiB. Pure torch, so it runs on the GPU next to a GPUDirect read with no copy
  to the host; the CPU computes the same value, more slowly.

Either reader can check either algorithm; the writer picks the one that suits its device.
"""

from __future__ import annotations

import struct

import torch
import xxhash

XXH3_64 = 1
HALFSUM3 = 2
NAMES = {XXH3_64: "xxh3_64", HALFSUM3: "halfsum3"}
DIGEST_SIZE = 24
_MAX_HALFSUM_BYTES = 1 << 32


def _host_bytes(payload: torch.Tensor) -> memoryview:
    return memoryview(payload.cpu().numpy())


def xxh3_digest(payload: torch.Tensor) -> bytes:
    return xxhash.xxh3_64_digest(_host_bytes(payload)).ljust(DIGEST_SIZE, b"\0")


def _weighted_sum(words: torch.Tensor, period: int) -> torch.Tensor:
    """``Σ words[i] * (i mod period + 1)`` as int64, via per-column sums of a (rows, period) view."""
    body = words.numel() // period * period
    weights = torch.arange(1, period + 1, device=words.device, dtype=torch.int64)
    total = (words[body:].to(torch.int64) * weights[: words.numel() - body]).sum()
    if body:
        total = total + (words[:body].view(-1, period).sum(dim=0, dtype=torch.int64) * weights).sum()
    return total


def halfsum3_digest(payload: torch.Tensor) -> bytes:
    n = payload.numel()
    if n >= _MAX_HALFSUM_BYTES:
        raise ValueError(f"halfsum3 covers payloads below 4 GiB, got {n} bytes")
    if n % 2:
        payload = torch.cat([payload, payload.new_zeros(1)])
    words = payload.view(torch.int16).to(torch.int32) & 0xFFFF
    sums = torch.stack([words.sum(dtype=torch.int64), _weighted_sum(words, 65521), _weighted_sum(words, 65519)])
    return struct.pack("<3q", *sums.tolist())


def digest(payload: torch.Tensor, algorithm: int) -> bytes:
    """The ``DIGEST_SIZE``-byte digest of a 1-D uint8 payload under ``algorithm``."""
    if algorithm == XXH3_64:
        return xxh3_digest(payload)
    if algorithm == HALFSUM3:
        return halfsum3_digest(payload)
    raise ValueError(f"unknown checksum algorithm {algorithm}")


def algorithm_for(payload: torch.Tensor) -> int:
    """The algorithm a writer uses for a payload on this device."""
    return HALFSUM3 if payload.is_cuda else XXH3_64
