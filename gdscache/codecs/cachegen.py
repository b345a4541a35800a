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
from typing import Any

import numpy as np
import torch

from gdscache.codecs import _cuda, rans
from gdscache.codecs.base import Codec
from gdscache.codecs.profile import CodecProfile
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
_TABLES = rans.Tables(_FREQ)
_cost_cache: dict[tuple[torch.device, bool], torch.Tensor] = {}


def _cost(device: torch.device, kernel: bool = False) -> torch.Tensor:
    """float64 ``[A, 64]`` for the torch reference, int32 ``[64, A]`` for the kernel (same integers)."""
    if (device, kernel) not in _cost_cache:
        table = _COST.astype(np.int32) if kernel else _COST.T.copy()
        _cost_cache[device, kernel] = torch.from_numpy(table).to(device)
    return _cost_cache[device, kernel]


def _kernels_for(t: torch.Tensor) -> bool:
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
        base, rel = _base_rel(_cuda.cachegen_codes(x))
        q = _cuda.cachegen_quantize(x, _full_code(base, rel).contiguous(), sw, QMAX)
    else:
        x32 = x.to(torch.float32)
        if not bool(torch.isfinite(x32).all()):
            raise ValueError("cachegen cannot encode non-finite KV values (inf/nan)")
        base, rel = scale_codes(x32)
        denom = scale_from_code(_full_code(base, rel)).unsqueeze(-1) * sw.view(layers, planes, 1, heads, dim)
        q = torch.round(x32 / denom).clamp_(-QMAX, QMAX).to(torch.int16)
    return q.view(layers * planes, tokens, heads * dim), base, rel


def dequantize(q: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, sw: torch.Tensor, out: torch.Tensor) -> None:
    """Inverse of :func:`quantize` into a (maybe strided) ``out [L, P, T, H, D]``."""
    layers, planes, tokens, heads, dim = out.shape
    code = _full_code(base, rel)
    if _kernels_for(out):
        _cuda.cachegen_dequantize(q.contiguous(), code.contiguous(), sw, out)
        return
    denom = scale_from_code(code).unsqueeze(-1) * sw.view(layers, planes, 1, heads, dim)
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


def _section(payload: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    size = count * torch.empty((), dtype=dtype).element_size()
    raw = payload[offset:offset + size]
    if raw.numel() != size:
        raise ValueError(f"cachegen payload truncated at byte {offset}")
    if raw.data_ptr() % torch.empty((), dtype=dtype).element_size():
        raw = raw.clone()
    return raw.view(dtype), offset + size + (-size % 4)


class CacheGenCodec(Codec):
    """Lossy codec; ``profile`` is a :class:`CodecProfile`, a path to one, or None (default steps)."""

    name = "cachegen"
    lossless = False

    def __init__(self, profile: str | CodecProfile | None = None, step_scale: float = 1.0, group: int = 8):
        if not (isinstance(step_scale, (int, float)) and 0 < step_scale < 100):
            raise ValueError(f"cachegen step_scale must be in (0, 100), got {step_scale!r}")
        if group not in (1, 2, 4, 8):
            raise ValueError(f"cachegen group must be 1, 2, 4 or 8 channels per stream, got {group!r}")
        self.profile = CodecProfile.load(profile) if isinstance(profile, str) else profile
        self.step_scale = float(step_scale)
        self.group = group
        self._sw: dict[tuple, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        return {"version": VERSION, "profile": self.profile.digest() if self.profile else "default",
                "step_scale": self.step_scale, "group": self.group}

    def _profile_for(self, spec: KVSpec) -> CodecProfile:
        profile = self.profile or CodecProfile.default(spec)
        profile.check(spec)
        return profile

    def _step_table(self, spec: KVSpec, device: torch.device) -> torch.Tensor:
        key = (spec.num_layers, spec.kv_planes, spec.num_kv_heads, spec.head_dim, device)
        if key not in self._sw:
            table = self._profile_for(spec).step_table(self.step_scale)
            self._sw[key] = torch.from_numpy(table).to(device)
        return self._sw[key]

    def _digest(self, spec: KVSpec) -> bytes:
        return bytes.fromhex(self._profile_for(spec).digest())

    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        spec = KVSpec.of(chunk)
        if dtype_name(spec.dtype) not in _DTYPE_CODES:
            raise ValueError(f"cachegen encodes float32/float16/bfloat16 KV, got {spec.dtype}")
        layers, planes, tokens, heads, dim = chunk.shape
        if tokens < 1 or tokens >= 1 << 24:
            raise ValueError(f"cachegen chunk must have 1..2**24-1 tokens, got {tokens}")
        group = rans.pick_group(heads * dim, self.group)
        q, base, rel = quantize(chunk, self._step_table(spec, chunk.device))
        if _kernels_for(chunk):
            mu, table = _cuda.cachegen_stats(q, _cost(q.device, kernel=True), QMAX, OFFSET)
            lengths, words = rans.encode(q, table, _TABLES, group, mu=mu, offset=OFFSET)
        else:
            sym, mu, table = channel_stats(q)
            lengths, words = rans.encode(sym, table, _TABLES, group)
        header = _HEADER.pack(MAGIC, VERSION, planes, layers, tokens, heads, dim, group, QMAX,
                              _DTYPE_CODES[dtype_name(spec.dtype)], self._digest(spec), LIBRARY_DIGEST)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(chunk.device)
        return torch.cat([head, _pad4(base), _pad4(rel), _pad4(mu), _pad4(table), _pad4(lengths), words.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("cachegen payload must be a 1-D uint8 tensor")
        if tuple(out.shape) != spec.chunk_shape(num_tokens):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {spec.chunk_shape(num_tokens)}")
        if payload.numel() < _HEADER.size:
            raise ValueError(f"cachegen payload is {payload.numel()} bytes, shorter than its header")
        if dtype_name(spec.dtype) not in _DTYPE_CODES:
            raise ValueError(f"cachegen decodes into float32/float16/bfloat16, got {spec.dtype}")
        payload = payload.to(out.device)
        fields = _HEADER.unpack(payload[:_HEADER.size].cpu().numpy().tobytes())
        magic, version, planes, layers, tokens, heads, dim, group, qmax, dcode, digest, library = fields
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a cachegen v{VERSION} payload (magic {magic!r}, version {version})")
        if (layers, planes, tokens, heads, dim) != spec.chunk_shape(num_tokens):
            raise ValueError(f"cachegen payload holds KV {(layers, planes, tokens, heads, dim)}, "
                             f"expected {spec.chunk_shape(num_tokens)}")
        if qmax != QMAX or group not in (1, 2, 4, 8) or (heads * dim) % group:
            raise ValueError(f"cachegen payload has unsupported qmax {qmax} or group {group}")
        if digest != self._digest(spec):
            raise ValueError("cachegen payload was written with another codec profile")
        if library != LIBRARY_DIGEST:
            raise ValueError("cachegen payload was written with another probability-table library")
        rows, channels = layers * planes, heads * dim
        off = _HEADER.size
        base, off = _section(payload, off, layers * planes * heads, torch.int16)
        rel, off = _section(payload, off, layers * planes * tokens * heads, torch.uint8)
        mu, off = _section(payload, off, rows * channels, torch.int8)
        table, off = _section(payload, off, rows * channels, torch.uint8)
        lengths, off = _section(payload, off, rows * channels // group, torch.int32)
        if (payload.numel() - off) % 2:
            raise ValueError("cachegen payload has a partial entropy-coded word")
        words, _ = _section(payload, off, (payload.numel() - off) // 2, torch.int16)
        if _kernels_for(out):
            _, cum, lut = _TABLES.on(out.device)
            _cuda.cachegen_decode(words, lengths, table, mu, base, rel, cum, lut, ALPHABET, len(_FREQ), QMAX, OFFSET,
                                  self._step_table(spec, out.device), group, out)
            return
        if bool((table.to(torch.int32) >= len(_FREQ)).any()) or bool((mu.abs() > QMAX).any()):
            raise ValueError("cachegen payload has out-of-range channel statistics")
        if bool(((base < _CODE_MIN) | (base > _CODE_MAX - 255)).any()):
            raise ValueError("cachegen payload has out-of-range scale codes")
        sym = rans.decode(words, lengths, table.view(rows, channels), _TABLES, (rows, tokens, channels), group)
        q = sym.to(torch.int32) - OFFSET + mu.view(rows, 1, channels).to(torch.int32)
        if bool((q.abs() > QMAX).any()):
            raise ValueError("cachegen payload decodes to out-of-range symbols")
        dequantize(q.to(torch.int16), base.view(layers, planes, heads), rel.view(layers, planes, tokens, heads),
                   self._step_table(spec, out.device), out)
