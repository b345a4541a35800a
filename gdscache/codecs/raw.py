"""``raw``: the KV bytes as they are."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdscache.codecs import _cuda
from gdscache.codecs.base import Codec
from gdscache.pages import KVPages, stacked_view
from gdscache.spec import KVSpec
from io_backends.buffers import host_pool


class RawCodec(Codec):
    name = "raw"
    lossless = True
    decodes_from_host = True
    pages_in_place = True

    def encode_many(self, chunks: Sequence[torch.Tensor | KVPages]) -> list[torch.Tensor]:
        """On a GPU, chunks that are evenly spaced views of one tensor (consecutive token slices of a request's KV)
        are copied with one kernel into one new buffer, and each payload is its slice of it."""
        stacked = stacked_view(chunks)
        if stacked is None or not stacked.is_cuda:
            return super().encode_many(chunks)
        out = torch.empty(stacked.shape, dtype=stacked.dtype, device=stacked.device)
        _copy_wide(out, stacked)
        return list(out.view(len(chunks), -1).view(torch.uint8).unbind())

    def decode_many(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int,
                    outs: Sequence[torch.Tensor | KVPages]) -> list[str | None]:
        """On a GPU, payloads that are evenly spaced slices of one buffer (a batched read's) going to evenly spaced
        views of one tensor (consecutive token slices of ``out``) are copied with one kernel; host payloads (DRAM-tier
        hits) go to GPU tensors by the copy engines, straight into their rows of ``out``."""
        expected = spec.bytes_per_token() * num_tokens
        src = stacked_view(payloads)
        if src is not None and src.is_cuda and src.dim() == 2 and src.shape[1] == expected:
            dst = stacked_view(outs)
            if dst is not None and src.device == dst.device and src.stride(0) % spec.dtype.itemsize == 0 and \
                    src.data_ptr() % spec.dtype.itemsize == 0:
                _copy_wide(dst, src.view(spec.dtype).view(dst.shape))
                return [None] * len(payloads)
        elif payloads and not payloads[0].is_cuda and all(p.numel() == expected for p in payloads) and \
                self._copy_rows_from_host(payloads, outs, spec, same_strides=stacked_view(outs) is not None):
            return [None] * len(payloads)
        return super().decode_many(payloads, spec, num_tokens, outs)

    @staticmethod
    def _copy_rows_from_host(payloads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor | KVPages], spec: KVSpec,
                             same_strides: bool) -> bool:
        """Copy host payloads into GPU tensors whose ``[layer, plane]`` rows are evenly spaced (the token slices of
        an engine's ``[L, P, T, H, D]`` KV; ``same_strides``: all of them strided as the first): one 2-D copy each,
        no staging on the GPU; False where that does not apply (nothing copied)."""
        rows = _rows(outs[0])
        if rows is None or not outs[0].is_cuda or \
                (not same_strides and any(_rows(out) != rows or out.device != outs[0].device for out in outs[1:])):
            return False
        return RawCodec._copy_rows_to(payloads, [out.data_ptr() for out in outs], rows, outs[0], spec)

    @staticmethod
    def _copy_rows_to(payloads: Sequence[torch.Tensor], dests: list[int], rows: tuple[int, int, int],
                      on: torch.Tensor, spec: KVSpec) -> bool:
        """Copy contiguous host ``payloads`` (chunks of ``spec``) to GPU addresses ``dests`` laid out as ``rows``
        (:func:`_rows`, of a tensor like ``on``) on the current stream of ``on``'s device, held until it has run them;
        False, with nothing copied, where the kernel library is missing, a payload is not a contiguous host buffer of
        one chunk's bytes, or the rows are not ``spec``'s or wider apart than a 2-D copy allows."""
        count, width, pitch = rows
        if not _cuda.available() or on.dtype != spec.dtype or pitch > _cuda.MAX_PITCH or \
                any(p.is_cuda or not p.is_contiguous() or p.numel() != count * width for p in payloads):
            return False
        try:
            _cuda.copy_rows(dests, [p.data_ptr() for p in payloads], count, width, pitch, width, on)
        finally:  # copies queued before one that failed still read their buffers
            _cuda.hold_until_done(list(payloads), on)
        return True

    def decode_run(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int, out: torch.Tensor | KVPages,
                   start: int) -> bool:
        """Host payloads into a GPU tensor by 2-D copies, the destinations reckoned from ``out``'s strides (no view per
        chunk): DRAM-tier hits of a whole request for a few Python calls."""
        end = start + len(payloads) * num_tokens
        if not payloads or isinstance(out, KVPages) or not out.is_cuda or end > out.shape[2] or out.dim() != 5:
            return False
        layers, planes, _, heads, dim = out.shape  # the rows of token slices of ``out``, reckoned without slicing it
        strides, size = out.stride(), out.element_size()
        rows = _rows_of((layers, planes, num_tokens, heads, dim), strides, size)
        if rows is None or _rows_of((layers, planes, end - start, heads, dim), strides, size) is None:
            return False  # the whole run's tokens must be evenly laid out, not only a chunk's
        step = num_tokens * strides[2] * size
        first = out.data_ptr() + start * strides[2] * size
        return self._copy_rows_to(payloads, [first + k * step for k in range(len(payloads))], rows, out, spec)

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


def _rows(out: torch.Tensor | KVPages) -> tuple[int, int, int] | None:
    """``(rows, bytes per row, bytes between rows)`` of a chunk ``[L, P, T, H, D]`` whose ``[l, p]`` slices are each
    contiguous, evenly spaced and not overlapping; None for any other layout (pages, other strides)."""
    if isinstance(out, KVPages) or out.dim() != 5:
        return None
    return _rows_of(out.shape, out.stride(), out.element_size())


def _rows_of(shape: Sequence[int], strides: Sequence[int], element_size: int) -> tuple[int, int, int] | None:
    """:func:`_rows` of a 5-D tensor of this shape, these strides and this element size."""
    layers, planes, tokens, heads, dim = shape
    s0, s1, s2, s3, s4 = strides
    if (s4 != 1 and dim > 1) or (s3 != dim and heads > 1) or (s2 != heads * dim and tokens > 1) or \
            (layers > 1 and planes > 1 and s0 != planes * s1):
        return None
    width = tokens * heads * dim
    pitch = width if layers * planes == 1 else s1 if planes > 1 else s0
    if pitch < width:  # rows that overlap
        return None
    return layers * planes, width * element_size, pitch * element_size


def _copy_wide(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (same shape and dtype) through 8- or 4-byte views of both where their layouts allow: a strided
    copy of 2-byte elements ran at half the speed on an H200 (0.085 against 0.039 ms for 64 MiB, RESULTS.md)."""
    for wide in (torch.int64, torch.int32):
        if dst.element_size() < wide.itemsize:
            try:
                dst, src = dst.view(wide), src.view(wide)
                break
            except RuntimeError:  # a dimension, stride or offset that does not divide: try narrower
                continue
    dst.copy_(src, non_blocking=True)
