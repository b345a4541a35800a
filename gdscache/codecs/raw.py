"""``raw``: the KV bytes as they are."""

from __future__ import annotations

import torch

from gdscache.codecs.base import Codec
from gdscache.spec import KVSpec


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        flat = chunk.contiguous()
        if flat.data_ptr() == chunk.data_ptr():
            flat = flat.clone()
        return flat.view(torch.uint8).reshape(-1)

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        expected = spec.bytes_per_token() * num_tokens
        if payload.numel() != expected:
            raise ValueError(f"raw payload has {payload.numel()} bytes, expected {expected}")
        out.copy_(payload.view(spec.dtype).view(spec.chunk_shape(num_tokens)), non_blocking=True)
