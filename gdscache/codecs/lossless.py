"""``lossless``: bit-exact KV codec. Exponent-aligned byte planes + rANS. Layout in docs/CODECS.md.

Each value's bits are rotated left by one (the sign moves to the lowest bit), so the most
significant byte holds the exponent (all 8 bits for bfloat16/float32). The rotated words are cut
into byte planes; each (layer, K/V, plane) gets one frequency table from its exact histogram
(stored in the payload), and its (channel group) streams are rANS-coded
(:mod:`gdscache.codecs.rans`).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from gdscache.codecs import rans
from gdscache.codecs.base import Codec
from gdscache.spec import FLOAT_DTYPES, KVSpec, dtype_name

MAGIC = b"GDLL"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIHHBBBx")  # 20 bytes
_DTYPE_CODES = {name: i for i, name in enumerate(FLOAT_DTYPES)}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _planes(chunk: torch.Tensor) -> torch.Tensor:
    """``[L, P, T, H, D]`` -> byte planes ``[L*P*B, T, H*D]`` (int16), most significant first."""
    layers, planes, tokens, heads, dim = chunk.shape
    nbytes = chunk.element_size()
    bits, mask = 8 * nbytes, (1 << 8 * nbytes) - 1
    wide = torch.int64 if nbytes == 4 else torch.int32
    v = chunk.contiguous().view(_INT_VIEW[nbytes]).to(wide) & mask
    rot = ((v << 1) | (v >> (bits - 1))) & mask
    shifts = torch.arange(nbytes - 1, -1, -1, device=chunk.device) * 8
    out = (rot.view(layers, planes, 1, tokens, heads * dim) >> shifts.view(1, 1, -1, 1, 1)) & 0xFF
    return out.reshape(layers * planes * nbytes, tokens, heads * dim).to(torch.int16)


def _unplanes(sym: torch.Tensor, spec: KVSpec, tokens: int) -> torch.Tensor:
    nbytes = spec.dtype.itemsize
    bits, mask = 8 * nbytes, (1 << 8 * nbytes) - 1
    shifts = torch.arange(nbytes - 1, -1, -1, device=sym.device) * 8
    planes = sym.to(torch.int64 if nbytes == 4 else torch.int32).view(spec.num_layers, spec.kv_planes, nbytes, tokens, -1)
    rot = (planes << shifts.view(1, 1, -1, 1, 1)).sum(dim=2)
    v = ((rot >> 1) | ((rot & 1) << (bits - 1))) & mask
    if nbytes > 1:
        v = torch.where(v >= 1 << (bits - 1), v - (1 << bits), v)  # back to the signed view
    return v.to(_INT_VIEW[nbytes]).view(spec.dtype).view(spec.chunk_shape(tokens))


class LosslessCodec(Codec):
    name = "lossless"
    lossless = True

    def __init__(self, group: int = 8):
        if group not in (1, 2, 4, 8):
            raise ValueError(f"lossless group must be 1, 2, 4 or 8 channels per stream, got {group!r}")
        self.group = group

    def params(self) -> dict:
        return {"version": VERSION, "group": self.group}

    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        spec = KVSpec.of(chunk)
        layers, planes, tokens, heads, dim = chunk.shape
        if tokens < 1:
            raise ValueError("lossless chunk must have at least one token")
        group = rans.pick_group(heads * dim, self.group)
        sym = _planes(chunk)
        rows = sym.shape[0]
        index = sym.view(rows, -1).to(torch.int32) + 256 * torch.arange(rows, dtype=torch.int32, device=chunk.device)[:, None]
        hist = torch.bincount(index.view(-1), minlength=rows * 256).view(rows, 256)
        freq = rans.normalize_counts(hist.cpu().numpy())
        tab = torch.arange(rows, dtype=torch.int32, device=chunk.device).view(rows, 1).expand(rows, heads * dim)
        lengths, words = rans.encode(sym, tab, rans.Tables(freq), group)
        header = _HEADER.pack(MAGIC, VERSION, planes, layers, tokens, heads, dim, group, chunk.element_size(),
                              _DTYPE_CODES[dtype_name(spec.dtype)])
        head = torch.frombuffer(bytearray(header + freq.astype("<u2").tobytes()), dtype=torch.uint8)
        return torch.cat([head.to(chunk.device), lengths.view(torch.uint8), words.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("lossless payload must be a 1-D uint8 tensor")
        if tuple(out.shape) != spec.chunk_shape(num_tokens):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {spec.chunk_shape(num_tokens)}")
        if payload.numel() < _HEADER.size:
            raise ValueError(f"lossless payload is {payload.numel()} bytes, shorter than its header")
        payload = payload.to(out.device)
        magic, version, planes, layers, tokens, heads, dim, group, nbytes, dcode = _HEADER.unpack(
            payload[:_HEADER.size].cpu().numpy().tobytes())
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a lossless v{VERSION} payload (magic {magic!r}, version {version})")
        if (layers, planes, tokens, heads, dim) != spec.chunk_shape(num_tokens):
            raise ValueError(f"lossless payload holds KV {(layers, planes, tokens, heads, dim)}, "
                             f"expected {spec.chunk_shape(num_tokens)}")
        if dcode != _DTYPE_CODES[dtype_name(spec.dtype)] or nbytes != spec.dtype.itemsize:
            raise ValueError(f"lossless payload holds another dtype (code {dcode}), expected {dtype_name(spec.dtype)}")
        channels = heads * dim
        if group not in (1, 2, 4, 8) or channels % group:
            raise ValueError(f"lossless payload has an unsupported group {group}")
        rows = layers * planes * nbytes
        streams = rows * channels // group
        off = _HEADER.size + rows * 512
        if payload.numel() < off + 4 * streams or (payload.numel() - off) % 2:
            raise ValueError("lossless payload is truncated")
        freq = np.frombuffer(payload[_HEADER.size:off].cpu().numpy().tobytes(), dtype="<u2").reshape(rows, 256)
        if np.any(freq.astype(np.int64).sum(axis=1) != rans.PROB_SCALE):
            raise ValueError("lossless payload has a malformed frequency table")
        body = payload[off:].clone() if payload[off:].data_ptr() % 4 else payload[off:]
        lengths = body[:4 * streams].view(torch.int32)
        words = body[4 * streams:].view(torch.int16)
        tab = torch.arange(rows, dtype=torch.int32, device=out.device).view(rows, 1).expand(rows, channels)
        sym = rans.decode(words, lengths, tab, rans.Tables(freq.astype(np.uint32)), (rows, num_tokens, channels), group)
        out.copy_(_unplanes(sym, spec, num_tokens))
