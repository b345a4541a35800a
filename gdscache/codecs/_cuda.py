"""ctypes binding to the codec kernels in cuda/ (``libgdscache_cuda.so``, a plain C ABI).

The library takes raw device pointers and the current CUDA stream, so it does not depend on the
torch C++ ABI. It is looked up at ``$GDSCACHE_CUDA_LIB``, then next to this module (where
``pip install`` puts it when nvcc exists). Without it every codec runs its torch/numpy reference.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

LIB_NAME = "libgdscache_cuda.so"
_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("GDSCACHE_NO_KERNELS") == "1":
        return None
    here = Path(__file__).resolve()
    candidates = [os.environ.get("GDSCACHE_CUDA_LIB"), str(here.with_name(LIB_NAME)),
                  str(here.parents[2] / "build" / "cuda" / LIB_NAME)]
    for path in candidates:
        if path and Path(path).is_file():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
            lib.gdc_rans_encode.argtypes = [p, i, i, i, i, p, p, p, i, p, i, p, p, p]
            lib.gdc_rans_compact.argtypes = [p, p, p, i, i, p, p]
            lib.gdc_rans_decode.argtypes = [p, i64, p, p, i, i, i, i, p, p, p, i, p, p, p]
            lib.gdc_cachegen_codes.argtypes = [p, i, i, i, i, i, i64, i64, i64, i64, i64, i, p, p, p]
            lib.gdc_cachegen_stats.argtypes = [p, i, i, i, p, i, i, i, i, p, p, p]
            lib.gdc_cachegen_decode.argtypes = ([p, i64, p, p, i, i, i, i, i, i, p, p, p, p, p, p, i, i, i, i, p]
                                                + [i64] * 5 + [i, p, p, p])
            lib.gdc_cachegen_quantize.argtypes = [p, i, i, i, i, i, i64, i64, i64, i64, i64, i, p, p, i, p, p]
            lib.gdc_cachegen_dequantize.argtypes = [p, p, p, i, i, i, i, i, i64, i64, i64, i64, i64, i, p, p]
            for fn in (lib.gdc_rans_encode, lib.gdc_rans_compact, lib.gdc_rans_decode, lib.gdc_cachegen_quantize,
                       lib.gdc_cachegen_dequantize, lib.gdc_cachegen_codes, lib.gdc_cachegen_stats,
                       lib.gdc_cachegen_decode):
                fn.restype = ctypes.c_int
            _lib = lib
            break
    return _lib


def available() -> bool:
    """True when the kernel library loads and CUDA is usable."""
    return torch.cuda.is_available() and _load() is not None


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"CUDA kernel {what} failed with cudaError {rc}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def rans_encode(sym: torch.Tensor, tab: torch.Tensor, freq: torch.Tensor, cum: torch.Tensor, alphabet: int,
                group: int, mu: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel twin of :func:`gdscache.codecs.rans.encode_ref` (int16 symbols, int32 tables)."""
    lib = _load()
    rows, tokens, channels = sym.shape
    streams, n = rows * channels // group, tokens * group
    scratch = torch.empty((n + 2, streams), dtype=torch.int16, device=sym.device)
    lengths = torch.empty(streams, dtype=torch.int32, device=sym.device)
    _check(lib.gdc_rans_encode(sym.data_ptr(), rows, tokens, channels, group, tab.data_ptr(), freq.data_ptr(),
                               cum.data_ptr(), alphabet, _ptr(mu), offset, scratch.data_ptr(), lengths.data_ptr(),
                               _stream()),
           "rans_encode")
    offsets = torch.cumsum(lengths, 0, dtype=torch.int64)
    total = int(offsets[-1])
    words = torch.empty(total, dtype=torch.int16, device=sym.device)
    _check(lib.gdc_rans_compact(scratch.data_ptr(), lengths.data_ptr(), offsets.data_ptr(), streams, n + 2,
                                words.data_ptr(), _stream()), "rans_compact")
    return lengths, words


def rans_decode(words: torch.Tensor, lengths: torch.Tensor, tab: torch.Tensor, cum: torch.Tensor, lut: torch.Tensor,
                alphabet: int, shape: tuple[int, int, int], group: int) -> torch.Tensor:
    """Kernel twin of :func:`gdscache.codecs.rans.decode_ref`; ``ValueError`` when malformed."""
    lib = _load()
    rows, tokens, channels = shape
    n = tokens * group
    lengths = lengths.to(torch.int64)
    if not bool(((lengths >= 2) & (lengths <= n + 2)).all()) or int(lengths.sum()) != words.numel():
        raise ValueError("stream lengths do not match the entropy-coded section")
    offsets = torch.cumsum(lengths, 0) - lengths
    out = torch.empty(shape, dtype=torch.int16, device=words.device)
    err = torch.zeros(1, dtype=torch.int32, device=words.device)
    _check(lib.gdc_rans_decode(words.data_ptr(), words.numel(), offsets.data_ptr(), lengths.data_ptr(), rows, tokens,
                               channels, group, tab.data_ptr(), cum.data_ptr(), lut.data_ptr(), alphabet, out.data_ptr(),
                               err.data_ptr(), _stream()), "rans_decode")
    if int(err) != 0:
        raise ValueError("entropy-coded stream is corrupt (final rANS state or word count mismatch)")
    return out


def cachegen_quantize(x: torch.Tensor, code: torch.Tensor, sw: torch.Tensor, qmax: int) -> torch.Tensor:
    """Fused ``q = clamp(round(x / (scale(code) * sw)))`` for a strided ``[L, P, T, H, D]`` chunk -> int16."""
    lib = _load()
    layers, planes, tokens, heads, dim = x.shape
    q = torch.empty((layers, planes, tokens, heads * dim), dtype=torch.int16, device=x.device)
    s = x.stride()
    _check(lib.gdc_cachegen_quantize(x.data_ptr(), layers, planes, tokens, heads * dim, dim, *s, _dtype_code(x.dtype),
                                     code.data_ptr(), sw.data_ptr(), qmax, q.data_ptr(), _stream()),
           "cachegen_quantize")
    return q


def cachegen_dequantize(q: torch.Tensor, code: torch.Tensor, sw: torch.Tensor, out: torch.Tensor) -> None:
    """Fused ``out = q * scale(code) * sw`` written into a strided ``[L, P, T, H, D]`` ``out``."""
    lib = _load()
    layers, planes, tokens, heads, dim = out.shape
    _check(lib.gdc_cachegen_dequantize(q.data_ptr(), code.data_ptr(), sw.data_ptr(), layers, planes, tokens,
                                       heads * dim, dim, *out.stride(), _dtype_code(out.dtype), out.data_ptr(),
                                       _stream()),
           "cachegen_dequantize")


def cachegen_codes(x: torch.Tensor) -> torch.Tensor:
    """Scale codes ``[L, P, T, H]`` (int32) of a strided chunk; ``ValueError`` on inf/nan."""
    lib = _load()
    layers, planes, tokens, heads, dim = x.shape
    code = torch.empty((layers, planes, tokens, heads), dtype=torch.int32, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    _check(lib.gdc_cachegen_codes(x.data_ptr(), layers, planes, tokens, heads, dim, *x.stride(), _dtype_code(x.dtype),
                                  code.data_ptr(), flag.data_ptr(), _stream()), "cachegen_codes")
    if int(flag):
        raise ValueError("cachegen cannot encode non-finite KV values (inf/nan)")
    return code


def cachegen_stats(q: torch.Tensor, cost: torch.Tensor, qmax: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mu int8 [R, C], table uint8 [R, C])`` of ``q [R, T, C]``; ``cost`` int32 ``[64, A]``."""
    lib = _load()
    rows, tokens, channels = q.shape
    mu = torch.empty((rows, channels), dtype=torch.int8, device=q.device)
    tab = torch.empty((rows, channels), dtype=torch.uint8, device=q.device)
    _check(lib.gdc_cachegen_stats(q.data_ptr(), rows, tokens, channels, cost.data_ptr(), cost.shape[0], cost.shape[1],
                                  qmax, offset, mu.data_ptr(), tab.data_ptr(), _stream()), "cachegen_stats")
    return mu, tab


def cachegen_decode(words: torch.Tensor, lengths: torch.Tensor, tab: torch.Tensor, mu: torch.Tensor,
                    base: torch.Tensor, rel: torch.Tensor, cum: torch.Tensor, lut: torch.Tensor, alphabet: int,
                    tables: int, qmax: int, offset: int, sw: torch.Tensor, group: int, out: torch.Tensor) -> None:
    """Fused rANS decode + dequantize + strided store into ``out [L, P, T, H, D]``; ``ValueError`` if malformed."""
    lib = _load()
    layers, planes, tokens, heads, dim = out.shape
    offsets = torch.cumsum(lengths, 0, dtype=torch.int64) - lengths
    err = torch.zeros(1, dtype=torch.int32, device=out.device)
    _check(lib.gdc_cachegen_decode(words.data_ptr(), words.numel(), offsets.data_ptr(), lengths.data_ptr(), layers,
                                   planes, tokens, heads, dim, group, tab.data_ptr(), mu.data_ptr(), base.data_ptr(),
                                   rel.data_ptr(), cum.data_ptr(), lut.data_ptr(), alphabet, tables, qmax, offset,
                                   sw.data_ptr(), *out.stride(), _dtype_code(out.dtype), out.data_ptr(), err.data_ptr(),
                                   _stream()), "cachegen_decode")
    if int(err):
        raise ValueError("cachegen payload is corrupt (entropy-coded streams or side information)")


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES[dtype]
