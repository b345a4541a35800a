"""``raw``: the KV bytes as they are."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdscache.codecs.base import Codec
from gdscache.pages import KVPages, stacked_view
from gdscache.spec import KVSpec
from io_backends.buffers import host_pool


class RawCodec(Codec):
    name = "raw"
    lossless = True
    pages_in_place = True

    def encode_many(self, chunks: Sequence[torch.Tensor | KVPages]) -> list[torch.Tensor]:
        """On a GPU, chunks that are evenly spaced views of one tensor (consecutive token slices of a request's KV)
        are copied with one kernel into one new buffer, and each payload is its slice of it."""
        stacked = stacked_view(chunks)
        if stacked is None or not stacked.is_cuda:
            return super().encode_many(chunks)
        out = torch.empty(stacked.shape, dtype=stacked.dtype, device=stacked.device)
        out.copy_(stacked)
        return list(out.view(len(chunks), -1).view(torch.uint8).unbind())

    def decode_many(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int,
                    outs: Sequence[torch.Tensor | KVPages]) -> list[str | None]:
        """On a GPU, payloads that are evenly spaced slices of one buffer (a batched read's) going to evenly spaced
        views of one tensor (consecutive token slices of ``out``) are copied with one kernel."""
        expected = spec.bytes_per_token() * num_tokens
        if payloads and all(p.numel() == expected for p in payloads):
            src, dst = stacked_view(payloads), stacked_view(outs)
            if src is not None and dst is not None and src.is_cuda and src.device == dst.device and \
                    src.stride(0) % spec.dtype.itemsize == 0 and src.data_ptr() % spec.dtype.itemsize == 0:
                dst.copy_(src.view(spec.dtype).view(dst.shape), non_blocking=True)
                return [None] * len(payloads)
        return super().decode_many(payloads, spec, num_tokens, outs)

    def encode(self, chunk: torch.Tensor | KVPages) -> torch.Tensor:
        """One copy of the (strided or paged) chunk into a new buffer; on the host, a pooled page-aligned one."""
        nbytes = chunk.shape.numel() * chunk.dtype.itemsize
        if chunk.is_cuda:
            payload = torch.empty(nbytes, dtype=torch.uint8, device=chunk.device)
        else:
            payload = host_pool.acquire(nbytes)
        view = payload.view(chunk.dtype).view(chunk.shape)
        if isinstance(chunk, KVPages):
            chunk.gather(out=view)
        else:
            view.copy_(chunk)
        return payload

    def direct_runs(self, out: torch.Tensor | KVPages) -> list[torch.Tensor] | None:
        """One run per (layer, plane) of a host tensor whose ``out[l, p]`` slices are contiguous.

        On the GPU one staging buffer and a device copy (~1 TB/s) beat many small file requests.
        """
        if isinstance(out, KVPages) or out.is_cuda:
            return None
        planes = [out[layer, plane] for layer in range(out.shape[0]) for plane in range(out.shape[1])]
        if not all(p.is_contiguous() for p in planes):
            return None
        return [p.reshape(-1).view(torch.uint8) for p in planes]

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor | KVPages) -> None:
        expected = spec.bytes_per_token() * num_tokens
        if payload.numel() != expected:
            raise ValueError(f"raw payload has {payload.numel()} bytes, expected {expected}")
        kv = payload.view(spec.dtype).view(spec.chunk_shape(num_tokens))
        if isinstance(out, KVPages):
            out.scatter(kv)
        else:
            out.copy_(kv, non_blocking=True)
