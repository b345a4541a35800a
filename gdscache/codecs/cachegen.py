"""``cachegen``: lossy KV codec. Per-token quantization + parametric rANS. Layout in docs/CODECS.md.

1. Per (layer, K/V, token, head): an absmax scale rounded *up* to 1/8 octave, stored as an int16
   base per (layer, K/V, head) plus a uint8 offset per token.
2. ``q = clamp(round(x / (scale * step[l, p] * weight[l, p, c])), -127, 127)``: the step per
   (layer, K/V) tensor and the per-channel weight come from the model's :class:`CodecProfile`.
3. Per (layer, K/V, channel) statistics for this chunk: an integer mean ``mu`` and the cheapest of
   64 fixed discretised Laplace/Gaussian tables for ``q - mu``; then rANS (:mod:`gdscache.codecs.rans`).

Every step is integer or exactly rounded fp32 arithmetic, so the CPU reference and the CUDA path
write the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from gdscache.codecs import _cuda, rans
from gdscache.codecs.base import Codec
from gdscache.codecs.profile import CodecProfile
from gdscache.pages import KVPages, as_tensor
from gdscache.spec import KVSpec, dtype_name

MAGIC = b"GDCG"
VERSION = 1
QMAX = 127
ALPHABET = 4 * QMAX + 3  # q - mu in [-2*QMAX, 2*QMAX], offset by 2*QMAX + 1
OFFSET = 2 * QMAX + 1
_HEADER = struct.Struct("<4sBBHIHHBBBx8s4s")  # 32 bytes
# fp32 mantissa bits of 2**(k/8), rounded up, k = 0..7: scale = (1 + MF/2**23) * 2**e >= absmax.
_MANTISSA_UP = (0, 759234, 1587185, 2490071, 3474676, 4548395, 5719293, 6996167)
_CODE_MIN, _CODE_MAX = -8 * 126, 8 * 127 - 1
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _build_library() -> tuple[np.ndarray, np.ndarray, bytes]:
    """64 tables over ``q - mu``: discretised Laplace and Gaussian, 32 geometric widths each."""
    r = np.arange(ALPHABET, dtype=np.float64) - OFFSET
    erf = np.vectorize(math.erf)
    tables = []
    for shape in ("laplace", "gauss"):
        for k in range(32):
            b = 0.18 * 1.26 ** k
            if shape == "laplace":
                cdf = lambda v, b=b: np.where(v < 0, 0.5 * np.exp(np.minimum(v, 0) / b), 1 - 0.5 * np.exp(-np.maximum(v, 0) / b))
            else:
                cdf = lambda v, b=b: 0.5 * (1 + erf(v / (b * math.sqrt(2))))
            p = np.maximum(cdf(r + 0.5) - cdf(r - 0.5), 0)
            p /= p.sum()
            f = 1 + np.floor(p * (rans.PROB_SCALE - ALPHABET)).astype(np.int64)
            f[f.argmax()] += rans.PROB_SCALE - f.sum()
            tables.append(f)
    freq = np.stack(tables).astype(np.uint32)
    # Integer costs (1/64 bit) so table choice is exact in any summation order, on any device.
    cost = np.round(-np.log2(freq / rans.PROB_SCALE) * 64)
    return freq, cost, hashlib.sha256(freq.tobytes()).digest()[:4]


_FREQ, _COST, LIBRARY_DIGEST = _build_library()
_CORRUPT = "cachegen payload is corrupt (entropy-coded streams or side information)"
_TABLES = rans.Tables(_FREQ)
_cost_cache: dict[tuple[torch.device, bool], torch.Tensor] = {}


def _cost(device: torch.device, kernel: bool = False) -> torch.Tensor:
    """The integer table costs: float64 ``[A, 64]`` for the torch reference, or for the kernel int16
    ``[64 * A]`` padded to 8 entries (every cost is <= 1024)."""
    if (device, kernel) not in _cost_cache:
        if kernel:
            flat = _COST.astype(np.int16).reshape(-1)
            table = np.concatenate([flat, np.zeros(-flat.size % 8, np.int16)])
        else:
            table = _COST.T.copy()
        _cost_cache[device, kernel] = torch.from_numpy(table).to(device)
    return _cost_cache[device, kernel]


def _kernels_for(t: torch.Tensor | KVPages) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16) and _cuda.available()


def scale_from_code(code: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2**(code/8)`` rounded up, from int32 codes in ``[_CODE_MIN, _CODE_MAX]``."""
    mant = torch.tensor(_MANTISSA_UP, dtype=torch.int32, device=code.device)[code & 7]
    exp = (code >> 3) + 127
    return ((exp << 23) | mant).view(torch.float32)


def _raw_codes(x32: torch.Tensor) -> torch.Tensor:
    """Per (layer, plane, token, head) int32 code of the absmax; ``_CODE_MAX`` for zero/denormal rows."""
    bits = x32.abs().amax(dim=-1).view(torch.int32)
    exp, mant = bits >> 23, bits & 0x7FFFFF
    mf = torch.tensor(_MANTISSA_UP, dtype=torch.int32, device=x32.device)
    k = (mant.unsqueeze(-1) > mf).sum(-1, dtype=torch.int32)
    return torch.where(exp > 0, 8 * (exp - 127) + k, torch.full_like(exp, _CODE_MAX))


def scale_codes(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x32 [L, P, T, H, D]`` -> ``(base int16 [L, P, H], rel uint8 [L, P, T, H])``; final code = base + rel."""
    return _base_rel(_raw_codes(x32))


def _base_rel(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nonzero = code != _CODE_MAX  # zero and denormal rows quantize to 0 under any scale
    base = code.amin(dim=2)
    base = torch.where(base == _CODE_MAX, torch.zeros_like(base), base).clamp(_CODE_MIN, _CODE_MAX - 255)
    rel = torch.where(nonzero, (code - base.unsqueeze(2)).clamp(0, 255), torch.zeros_like(code))
    return base.to(torch.int16), rel.to(torch.uint8)


def _full_code(base: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    return base.to(torch.int32).unsqueeze(2) + rel.to(torch.int32)


def quantize(x: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk ``[L, P, T, H, D]`` -> ``(q int16 [L*P, T, H*D], base, rel)``; ``sw`` fp32 ``[L, P, H*D]``."""
    layers, planes, tokens, heads, dim = x.shape
    if _kernels_for(x):
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        base, rel = _kernel_scales(x, flag)
        if int(flag):
            raise ValueError("cachegen cannot encode non-finite KV values (inf/nan)")
        return _cuda.cachegen_quantize(x, base, rel, sw, QMAX), base, rel
    x32 = x.to(torch.float32)
    if not bool(torch.isfinite(x32).all()):
        raise ValueError("cachegen cannot encode non-finite KV values (inf/nan)")
    base, rel = scale_codes(x32)
    denom = scale_from_code(_full_code(base, rel)).unsqueeze(-1) * sw.view(layers, planes, 1, heads, dim)
    q = torch.round(x32 / denom).clamp_(-QMAX, QMAX).to(torch.int16)
    return q.view(layers * planes, tokens, heads * dim), base, rel


def _kernel_scales(x: torch.Tensor, flag: torch.Tensor, base: torch.Tensor | None = None,
                   rel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel twin of :func:`scale_codes` (into ``base``/``rel`` when given); ``flag`` becomes 1 on inf/nan."""
    layers, planes, tokens, heads, _ = x.shape
    code = torch.empty((layers, planes, tokens, heads), dtype=torch.int32, device=x.device)
    _cuda.cachegen_codes(x, code, flag)
    base = torch.empty((layers, planes, heads), dtype=torch.int16, device=x.device) if base is None else base
    rel = torch.empty((layers, planes, tokens, heads), dtype=torch.uint8, device=x.device) if rel is None else rel
    _cuda.cachegen_base_rel(code, base, rel)
    return base, rel


def dequantize(q: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, sw: torch.Tensor, out: torch.Tensor) -> None:
    """Inverse of :func:`quantize` into a (maybe strided) ``out [L, P, T, H, D]``."""
    layers, planes, _, heads, dim = out.shape
    if _kernels_for(out):
        _cuda.cachegen_dequantize(q.contiguous(), base.contiguous(), rel.contiguous(), sw, out)
        return
    denom = scale_from_code(_full_code(base, rel)).unsqueeze(-1) * sw.view(layers, planes, 1, heads, dim)
    out.copy_((q.view(out.shape).to(torch.float32) * denom).to(out.dtype))


def channel_stats(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [R, T, C]`` -> ``(symbols int16 [R, T, C], mu int8 [R, C], table uint8 [R, C])``."""
    rows, tokens, channels = q.shape
    q32 = q.to(torch.int32)
    mu = torch.div(q32.sum(dim=1) + tokens // 2, tokens, rounding_mode="floor").clamp_(-QMAX, QMAX)
    sym = q32 - mu.unsqueeze(1) + OFFSET
    hist = torch.zeros(rows * channels, ALPHABET, dtype=torch.float64, device=q.device)
    idx = sym.transpose(1, 2).reshape(rows * channels, tokens).to(torch.int64)
    hist.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64, device=q.device))
    table = (hist @ _cost(q.device)).argmin(dim=1).view(rows, channels)
    return sym.to(torch.int16), mu.to(torch.int8), table.to(torch.uint8)


def _pad4(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().view(torch.uint8).reshape(-1)
    pad = -flat.numel() % 4
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def _side_layout(layers: int, planes: int, tokens: int, heads: int, dim: int,
                 group: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Byte (offset, size) of each side-information section after the header, and where the words start."""
    rows, channels = layers * planes, heads * dim
    sizes = {"base": 2 * rows * heads, "rel": rows * tokens * heads, "mu": rows * channels, "table": rows * channels,
             "lengths": 4 * rows * channels // group}
    spans, off = {}, _HEADER.size
    for name, size in sizes.items():
        spans[name] = (off, size)
        off += size + (-size % 4)
    return spans, off


class Sections(NamedTuple):
    """Views of a payload's sections (see docs/CODECS.md)."""

    group: int
    base: torch.Tensor
    rel: torch.Tensor
    mu: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor
    words: torch.Tensor


class CacheGenCodec(Codec):
    """Lossy codec; ``profile`` is a :class:`CodecProfile`, a path to one, or None (default steps)."""

    name = "cachegen"
    lossless = False
    batches = True
    pages_in_place = True  # the kernels read and write pages directly; the CPU reference gathers and scatters

    def __init__(self, profile: str | CodecProfile | None = None, step_scale: float = 1.0, group: int = 8):
        if not (isinstance(step_scale, (int, float)) and 0 < step_scale < 100):
            raise ValueError(f"cachegen step_scale must be in (0, 100), got {step_scale!r}")
        if group not in (1, 2, 4, 8):
            raise ValueError(f"cachegen group must be 1, 2, 4 or 8 channels per stream, got {group!r}")
        self.profile = CodecProfile.load(profile) if isinstance(profile, str) else profile
        self.step_scale = float(step_scale)
        self.group = group
        self._sw: dict[tuple, torch.Tensor] = {}
        self._heads: dict[tuple[bytes, torch.device], torch.Tensor] = {}
        self._profiles: dict[tuple[int, int, int, int], CodecProfile] = {}

    def params(self) -> dict[str, Any]:
        return {"version": VERSION, "profile": self.profile.digest() if self.profile else "default",
                "step_scale": self.step_scale, "group": self.group}

    def _profile_for(self, spec: KVSpec) -> CodecProfile:
        key = (spec.num_layers, spec.kv_planes, spec.num_kv_heads, spec.head_dim)
        if key not in self._profiles:
            profile = self.profile or CodecProfile.default(spec)
            profile.check(spec)
            self._profiles[key] = profile
        return self._profiles[key]

    def _step_table(self, spec: KVSpec, device: torch.device) -> torch.Tensor:
        key = (spec.num_layers, spec.kv_planes, spec.num_kv_heads, spec.head_dim, device)
        if key not in self._sw:
            table = self._profile_for(spec).step_table(self.step_scale)
            self._sw[key] = torch.from_numpy(table).to(device)
        return self._sw[key]

    def _digest(self, spec: KVSpec) -> bytes:
        return bytes.fromhex(self._profile_for(spec).digest())

    def encode(self, chunk: torch.Tensor | KVPages) -> torch.Tensor:
        group, header = self._check_chunk(chunk)
        if _kernels_for(chunk):
            return self._encode_kernels([chunk], group, header)[0]
        chunk = as_tensor(chunk)  # the torch reference reads a tensor
        spec = KVSpec.of(chunk)
        q, base, rel = quantize(chunk, self._step_table(spec, chunk.device))
        sym, mu, table = channel_stats(q)
        lengths, words = rans.encode(sym, table, _TABLES, group)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(chunk.device)
        return torch.cat([head, _pad4(base), _pad4(rel), _pad4(mu), _pad4(table), _pad4(lengths), words.view(torch.uint8)])

    def encode_many(self, chunks: Sequence[torch.Tensor | KVPages]) -> list[torch.Tensor]:
        """Chunks of one shape on one CUDA device are coded together: one statistics and one rANS launch for
        all of them, and one host sync. Pages are read in place."""
        if not chunks or not all(_kernels_for(c) and c.shape == chunks[0].shape and c.dtype == chunks[0].dtype
                                 and c.device == chunks[0].device for c in chunks):
            return super().encode_many(chunks)
        group, header = self._check_chunk(chunks[0])
        return self._encode_kernels(list(chunks), group, header)

    def _check_chunk(self, chunk: torch.Tensor | KVPages) -> tuple[int, bytes]:
        """Validate a chunk; the stream group it codes with, and its payload header."""
        spec = KVSpec.of(chunk)
        if dtype_name(spec.dtype) not in _DTYPE_CODES:
            raise ValueError(f"cachegen encodes float32/float16/bfloat16 KV, got {spec.dtype}")
        if isinstance(chunk, KVPages) and not chunk.complete:
            raise ValueError("cachegen cannot encode skipped pages (page id -1)")
        layers, planes, tokens, heads, dim = chunk.shape
        if tokens < 1 or tokens >= 1 << 23:
            raise ValueError(f"cachegen chunk must have 1..2**23-1 tokens, got {tokens}")
        group = rans.pick_group(heads * dim, self.group)
        header = _HEADER.pack(MAGIC, VERSION, planes, layers, tokens, heads, dim, group, QMAX,
                              _DTYPE_CODES[dtype_name(spec.dtype)], self._digest(spec), LIBRARY_DIGEST)
        return group, header

    def _encode_kernels(self, chunks: list[torch.Tensor | KVPages], group: int, header: bytes) -> list[torch.Tensor]:
        """The CUDA path for N same-shaped chunks: scale codes and quantization per chunk, then channel statistics
        and rANS over all of them; side information goes straight into place, and one host sync learns the coded
        sizes (and whether any chunk held inf/nan)."""
        layers, planes, tokens, heads, dim = chunks[0].shape
        rows, channels, device, n = layers * planes, heads * dim, chunks[0].device, len(chunks)
        streams = rows * channels // group
        spans, side_len = _side_layout(layers, planes, tokens, heads, dim, group)
        sides = torch.zeros((n, side_len), dtype=torch.uint8, device=device)
        sides[:, :_HEADER.size].copy_(self._header_on(header, device).expand(n, -1))

        def section(name: str, shape: tuple[int, ...], dtype: torch.dtype, k: int) -> torch.Tensor:
            off, size = spans[name]
            return sides[k, off:off + size].view(dtype).view(shape)

        sw = self._step_table(KVSpec.of(chunks[0]), device)
        q = torch.empty((n * rows, tokens, channels), dtype=torch.int16, device=device)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        for k, chunk in enumerate(chunks):
            base = section("base", (layers, planes, heads), torch.int16, k)
            rel = section("rel", (layers, planes, tokens, heads), torch.uint8, k)
            _kernel_scales(chunk, flag, base, rel)
            _cuda.cachegen_quantize(chunk, base, rel, sw, QMAX, q[k * rows:(k + 1) * rows])
        mu = torch.empty((n * rows, channels), dtype=torch.int8, device=device)
        table = torch.empty((n * rows, channels), dtype=torch.uint8, device=device)
        _cuda.cachegen_stats(q, _cost(device, kernel=True), len(_FREQ), ALPHABET, QMAX, OFFSET, mu, table)
        lengths = torch.empty(n * streams, dtype=torch.int32, device=device)
        scratch = _cuda.rans_encode_streams(q, table.to(torch.int32), _TABLES.on(device), group, mu, OFFSET, lengths)
        for name, values in (("mu", mu), ("table", table), ("lengths", lengths)):
            off, size = spans[name]
            sides[:, off:off + size].copy_(values.view(n, -1).view(torch.uint8))
        ends = torch.cumsum(lengths.view(n, streams), 1, dtype=torch.int64)
        *totals, bad = torch.cat([ends[:, -1], flag.to(torch.int64)]).tolist()  # the one host sync
        if bad:
            raise ValueError("cachegen cannot encode non-finite KV values (inf/nan)")
        payloads = []
        for k, total in enumerate(totals):
            payload = torch.empty(side_len + 2 * total, dtype=torch.uint8, device=device)
            payload[:side_len].copy_(sides[k])
            _cuda.rans_compact(scratch, lengths[k * streams:(k + 1) * streams], ends[k],
                               payload[side_len:].view(torch.int16), first=k * streams)
            payloads.append(payload)
        return payloads

    def _header_on(self, header: bytes, device: torch.device) -> torch.Tensor:
        """The payload header as a tensor on ``device``, kept so encoding copies it without a host sync."""
        key = (header, device)
        if key not in self._heads:
            self._heads[key] = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
        return self._heads[key]

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor | KVPages) -> None:
        _check_out(out, spec, num_tokens)
        sec = self.parse(payload.to(out.device), spec, num_tokens)
        if _kernels_for(out):
            if self._decode_kernels([sec], spec, [out])[0]:
                raise ValueError(_CORRUPT)
            return
        if isinstance(out, KVPages):  # the torch reference decodes into a tensor
            self._decode_staged(payload, spec, num_tokens, out)
            return
        layers, planes, tokens, heads, dim = out.shape
        rows, channels = layers * planes, heads * dim
        if bool((sec.table.to(torch.int32) >= len(_FREQ)).any()) or bool((sec.mu.abs() > QMAX).any()):
            raise ValueError("cachegen payload has out-of-range channel statistics")
        if bool(((sec.base < _CODE_MIN) | (sec.base > _CODE_MAX - 255)).any()):
            raise ValueError("cachegen payload has out-of-range scale codes")
        sym = rans.decode(sec.words, sec.lengths, sec.table.view(rows, channels), _TABLES, (rows, tokens, channels),
                          sec.group)
        q = sym.to(torch.int32) - OFFSET + sec.mu.view(rows, 1, channels).to(torch.int32)
        if bool((q.abs() > QMAX).any()):
            raise ValueError("cachegen payload decodes to out-of-range symbols")
        dequantize(q.to(torch.int16), sec.base.view(layers, planes, heads), sec.rel.view(layers, planes, tokens, heads),
                   self._step_table(spec, out.device), out)

    def decode_many(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int,
                    outs: Sequence[torch.Tensor | KVPages]) -> list[str | None]:
        """Outputs of one layout on one CUDA device (tensors or pages, written in place) are decoded by one launch
        and one host sync."""
        first = outs[0] if outs else None
        if not outs or not _cuda.same_strides(outs) or not all(
                _kernels_for(o) and o.dtype == first.dtype and o.device == first.device for o in outs):
            return super().decode_many(payloads, spec, num_tokens, outs)
        errors: list[str | None] = [None] * len(outs)
        batch: list[tuple[int, Sections]] = []
        for k, (payload, out) in enumerate(zip(payloads, outs, strict=True)):
            try:
                _check_out(out, spec, num_tokens)
                batch.append((k, self.parse(payload.to(out.device), spec, num_tokens)))
            except ValueError as exc:
                errors[k] = str(exc)
        if batch:
            corrupt = self._decode_kernels([sec for _, sec in batch], spec, [outs[k] for k, _ in batch])
            for (k, _), bad in zip(batch, corrupt, strict=True):
                errors[k] = _CORRUPT if bad else None
        return errors

    def _decode_kernels(self, secs: list[Sections], spec: KVSpec, outs: list[torch.Tensor | KVPages]) -> list[bool]:
        """Decode parsed chunks into ``outs`` with one fused launch; True where a chunk turned out corrupt."""
        device = outs[0].device

        def stacked(name: str) -> torch.Tensor:
            parts = [getattr(sec, name).reshape(-1) for sec in secs]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        word_end = torch.tensor(np.cumsum([sec.words.numel() for sec in secs]), dtype=torch.int64)
        err = _cuda.cachegen_decode(stacked("words"), word_end.to(device, non_blocking=True), stacked("lengths"),
                                    stacked("table"), stacked("mu"), stacked("base"), stacked("rel"),
                                    _TABLES.on(device), QMAX, OFFSET, self._step_table(spec, device), secs[0].group,
                                    outs)
        return [bool(e) for e in err.tolist()]

    def parse(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int) -> Sections:
        """Check a payload's header against ``spec`` and this codec; views of its sections (ValueError if not)."""
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("cachegen payload must be a 1-D uint8 tensor")
        if payload.numel() < _HEADER.size:
            raise ValueError(f"cachegen payload is {payload.numel()} bytes, shorter than its header")
        fields = _HEADER.unpack(payload[:_HEADER.size].cpu().numpy().tobytes())
        magic, version, planes, layers, tokens, heads, dim, group, qmax, _, digest, library = fields
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a cachegen v{VERSION} payload (magic {magic!r}, version {version})")
        if (layers, planes, tokens, heads, dim) != spec.chunk_shape(num_tokens):
            raise ValueError(f"cachegen payload holds KV {(layers, planes, tokens, heads, dim)}, "
                             f"expected {spec.chunk_shape(num_tokens)}")
        if qmax != QMAX or group != rans.pick_group(heads * dim, self.group):
            raise ValueError(f"cachegen payload has unsupported qmax {qmax} or group {group}")
        if digest != self._digest(spec):
            raise ValueError("cachegen payload was written with another codec profile")
        if library != LIBRARY_DIGEST:
            raise ValueError("cachegen payload was written with another probability-table library")
        spans, words_at = _side_layout(layers, planes, tokens, heads, dim, group)
        if payload.numel() < words_at or (payload.numel() - words_at) % 2:
            raise ValueError(f"cachegen payload of {payload.numel()} bytes is truncated or ends in a partial word")

        def view(start: int, size: int, dtype: torch.dtype) -> torch.Tensor:
            raw = payload[start:start + size]
            return (raw if raw.data_ptr() % raw.new_empty((), dtype=dtype).element_size() == 0 else raw.clone()).view(dtype)

        return Sections(group, view(*spans["base"], torch.int16), view(*spans["rel"], torch.uint8),
                        view(*spans["mu"], torch.int8), view(*spans["table"], torch.uint8),
                        view(*spans["lengths"], torch.int32),
                        view(words_at, payload.numel() - words_at, torch.int16))


def _check_out(out: torch.Tensor | KVPages, spec: KVSpec, num_tokens: int) -> None:
    if tuple(out.shape) != spec.chunk_shape(num_tokens):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {spec.chunk_shape(num_tokens)}")
    if dtype_name(spec.dtype) not in _DTYPE_CODES:
        raise ValueError(f"cachegen decodes into float32/float16/bfloat16, got {spec.dtype}")
