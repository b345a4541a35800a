"""``raw``: the KV bytes as they are."""

from __future__ import annotations

import torch

from gdscache.codecs.base import Codec
from gdscache.spec import KVSpec
from io_backends.buffers import host_pool


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        """One copy of the (strided) chunk into a new buffer; on the host, a pooled page-aligned one."""
        nbytes = chunk.numel() * chunk.element_size()
        if chunk.is_cuda:
            payload = torch.empty(nbytes, dtype=torch.uint8, device=chunk.device)
        else:
            payload = host_pool.acquire(nbytes)
        payload.view(chunk.dtype).view(chunk.shape).copy_(chunk)
        return payload

    def direct_runs(self, out: torch.Tensor) -> list[torch.Tensor] | None:
        """One run per (layer, plane) of a host tensor whose ``out[l, p]`` slices are contiguous.

        On the GPU one staging buffer and a device copy (~1 TB/s) beat many small file requests.
        """
        if out.is_cuda:
            return None
        planes = [out[layer, plane] for layer in range(out.shape[0]) for plane in range(out.shape[1])]
        if not all(p.is_contiguous() for p in planes):
            return None
        return [p.reshape(-1).view(torch.uint8) for p in planes]

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        expected = spec.bytes_per_token() * num_tokens
        if payload.numel() != expected:
            raise ValueError(f"raw payload has {payload.numel()} bytes, expected {expected}")
        out.copy_(payload.view(spec.dtype).view(spec.chunk_shape(num_tokens)), non_blocking=True)
