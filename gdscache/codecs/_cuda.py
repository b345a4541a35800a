"""ctypes binding to the kernels in cuda/ (``libgdscache_cuda.so``, a plain C ABI): the codecs' and the
GPU payload checksum's.

The library takes raw device pointers and the current CUDA stream, so it does not depend on the
torch C++ ABI. It is looked up at ``$GDSCACHE_CUDA_LIB``, then next to this module (where
``pip install`` puts it when nvcc exists), then in ``build/cuda``; a build from other source than
``cuda/gdscache_kernels.cu`` is passed over unless the variable names it (:class:`io_backends.native.SharedLibrary`).
Without it, or with ``GDSCACHE_NO_KERNELS=1``, every codec runs its torch/numpy reference.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gdscache.pages import KVPages
from io_backends.base import ForkSafeLock
from io_backends.native import SharedLibrary

if TYPE_CHECKING:
    from gdscache.codecs.rans import DeviceTables

LIB_NAME = "libgdscache_cuda.so"


def _bind(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    tables = [p, i, i, i, i]  # a DeviceTables: buffer, lut_off, end, count, alphabet
    signatures = {
        "gdc_rans_encode": [p, i, i, i, i, p, *tables, p, i, p, p, p],
        "gdc_rans_compact": [p, p, p, i, i64, i, p, p],
        "gdc_halfsum3": [p, i64, i64, i64, i64, p, p],
        "gdc_copy_rows": [i, p, p, i64, i64, i64, i64, p],
        "gdc_rans_decode": [p, i64, p, p, i, i, i, i, p, *tables, p, p, p],
        "gdc_cachegen_codes": [p, i, i, i, i, i, i64, i64, p, i64, i64, i, p, p, p],
        "gdc_cachegen_base_rel": [p, i, i, i, p, p, p],
        "gdc_cachegen_quantize": [p, i, i, i, i, i, i64, i64, p, i64, i64, i, p, p, p, i, p, p],
        "gdc_cachegen_dequantize": [p, p, p, p, i, i, i, i, i, i64, i64, p, i64, i64, i, p, p],
        "gdc_cachegen_stats": [p, i, i, i, p, i, i, i, i, p, p, p],
        "gdc_cachegen_decode": [p, p, p, p, i, i, i, i, i, i, i, p, p, p, p, *tables, i, i, p,
                                i64, i64, p, i64, i64, i, p, p, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int


_library = SharedLibrary(LIB_NAME, Path(__file__).resolve().parent, "GDSCACHE_CUDA_LIB", "GDSCACHE_NO_KERNELS", _bind,
                         Path(__file__).resolve().parents[2] / "cuda" / "gdscache_kernels.cu")
_load = _library.get


def available() -> bool:
    """True when the kernel library loads and CUDA is usable."""
    return torch.cuda.is_available() and _load() is not None


def _stream(on: torch.Tensor) -> int:
    """The current stream of ``on``'s device (naming the device also spares torch's lookup of the current one)."""
    return torch.cuda.current_stream(on.device).cuda_stream


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"CUDA kernel {what} failed with cudaError {rc}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _tables(t: DeviceTables) -> tuple[int, int, int, int, int]:
    return t.buf.data_ptr(), t.lut_off, t.buf.numel(), t.count, t.alphabet


def _aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``t`` contiguous with its data on an ``nbytes`` boundary (the kernels load symbol groups as vectors)."""
    t = t.contiguous()
    return t if t.data_ptr() % nbytes == 0 else t.clone()


def rans_encode_streams(sym: torch.Tensor, tab: torch.Tensor, tables: DeviceTables, group: int,
                        mu: torch.Tensor | None, offset: int, lengths: torch.Tensor) -> torch.Tensor:
    """Code every stream of int16 ``sym [R, T, C]`` into ``scratch int16 [T*G + 2, S]`` (returned) and their
    word counts into ``lengths`` (int32 ``[S]``): stream ``s``'s words end column ``s``. No host sync."""
    lib = _load()
    rows, tokens, channels = sym.shape
    streams, n = rows * channels // group, tokens * group
    sym = _aligned(sym, 2 * group)
    scratch = torch.empty((n + 2, streams), dtype=torch.int16, device=sym.device)
    _check(lib.gdc_rans_encode(sym.data_ptr(), rows, tokens, channels, group, tab.data_ptr(), *_tables(tables),
                               _ptr(mu), offset, scratch.data_ptr(), lengths.data_ptr(), _stream(sym)), "rans_encode")
    return scratch


def rans_compact(scratch: torch.Tensor, lengths: torch.Tensor, ends: torch.Tensor, out: torch.Tensor,
                 first: int = 0) -> None:
    """Pack the words of streams ``first ..`` (one per entry of ``lengths``) from ``scratch`` into ``out`` (int16),
    stream ``k``'s at ``[ends[k] - lengths[k], ends[k])``."""
    rows, columns = scratch.shape
    _check(_load().gdc_rans_compact(scratch.data_ptr() + 2 * first, lengths.data_ptr(), ends.data_ptr(),
                                    lengths.numel(), columns, rows, out.data_ptr(), _stream(out)), "rans_compact")


def rans_encode(sym: torch.Tensor, tab: torch.Tensor, tables: DeviceTables, group: int,
                mu: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel twin of :func:`gdscache.codecs.rans.encode_ref`: ``(lengths int32 [S], words int16 [W])``."""
    lengths = torch.empty(sym.shape[0] * sym.shape[2] // group, dtype=torch.int32, device=sym.device)
    scratch = rans_encode_streams(sym, tab, tables, group, mu, offset, lengths)
    ends = torch.cumsum(lengths, 0, dtype=torch.int64)
    words = torch.empty(int(ends[-1]), dtype=torch.int16, device=sym.device)
    rans_compact(scratch, lengths, ends, words)
    return lengths, words


def rans_decode(words: torch.Tensor, lengths: torch.Tensor, tab: torch.Tensor, tables: DeviceTables,
                shape: tuple[int, int, int], group: int) -> torch.Tensor:
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
                               channels, group, tab.data_ptr(), *_tables(tables), out.data_ptr(), err.data_ptr(),
                               _stream(words)), "rans_decode")
    if int(err) != 0:
        raise ValueError("entropy-coded stream is corrupt (final rANS state or word count mismatch)")
    return out


def halfsum3(words: torch.Tensor, start: int, sums: torch.Tensor) -> None:
    """Add the halfsum3 sums of int16 ``words`` (payload words ``start ..``) into int64 ``sums [3]``; no sync."""
    _check(_load().gdc_halfsum3(words.data_ptr(), 1, words.numel(), 0, start, sums.data_ptr(), _stream(words)),
           "halfsum3")


def halfsum3_rows(words: torch.Tensor, sums: torch.Tensor) -> None:
    """Add the halfsum3 sums of each row of int16 ``words [rows, n]`` (rows evenly spaced, each contiguous; one
    payload each, from word 0) into int64 ``sums [rows, 3]`` with one launch; no sync."""
    rows, n = words.shape
    if words.stride(1) != 1 or sums.shape != (rows, 3) or not sums.is_contiguous():
        raise ValueError(f"halfsum3_rows needs contiguous rows and [rows, 3] sums, got strides {words.stride()} "
                         f"and sums {tuple(sums.shape)}")
    _check(_load().gdc_halfsum3(words.data_ptr(), rows, n, words.stride(0), 0, sums.data_ptr(), _stream(words)),
           "halfsum3")


MAX_PITCH = (1 << 31) - 1
"""The widest row pitch a 2-D copy takes (``cudaDeviceProp.memPitch`` on NVIDIA GPUs)."""


def copy_rows(dsts: Sequence[int], srcs: Sequence[int], rows: int, width: int, dst_pitch: int, src_pitch: int,
              on: torch.Tensor) -> None:
    """Copy engines move ``rows`` rows of ``width`` bytes from each address in ``srcs`` (rows ``src_pitch`` bytes
    apart) to the address at the same place in ``dsts`` (``dst_pitch`` apart), in order, on the current stream of
    ``on``'s device; host memory in pinned buffers goes asynchronously (keep it alive: :func:`hold_until_done`)."""
    to, frm = np.asarray(dsts, dtype=np.uint64), np.asarray(srcs, dtype=np.uint64)
    _check(_load().gdc_copy_rows(len(to), to.ctypes.data, frm.ctypes.data, rows, width, dst_pitch, src_pitch,
                                 _stream(on)), "copy_rows")


_held: deque[tuple[torch.cuda.Event, list[torch.Tensor]]] = deque()
_held_lock = ForkSafeLock()


def hold_until_done(tensors: list[torch.Tensor], on: torch.Tensor) -> None:
    """Keep ``tensors`` (host buffers that copies queued outside torch read) from being freed, and their memory
    reused, before the work queued so far on the current stream of ``on``'s device has run. Those held for earlier
    work are let go of here, once it has run: until a later call, they stay allocated."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(on.device))
    with _held_lock:
        while _held and _held[0][0].query():
            _held.popleft()
        _held.append((done, tensors))


Chunk = torch.Tensor | KVPages
"""Where a chunk ``[L, P, T, H, D]`` lives: a strided tensor, or pages of a paged cache (read and written in place)."""


def _addressing(chunks: Sequence[Chunk]) -> tuple[int, tuple[int, int, int, int], torch.Tensor]:
    """How the kernels find N same-shaped chunks: a base pointer, the element strides of layer, plane, head and
    head_dim (shared by all), and int64 ``[N * T]`` offsets of each token from the base (-1: leave it alone)."""
    parts = []
    for chunk in chunks:
        if isinstance(chunk, KVPages):
            parts.append((chunk.pages.data_ptr(), chunk.strides(), chunk.token_offsets()))
        else:
            s = chunk.stride()
            parts.append((chunk.data_ptr(), (s[0], s[1], s[3], s[4]), np.arange(chunk.shape[2], dtype=np.int64) * s[2]))
    strides = parts[0][1]
    if any(part[1] != strides for part in parts):
        raise ValueError("chunks coded in one kernel launch must share their layer, plane, head and dim strides")
    base, elem = min(part[0] for part in parts), chunks[0].dtype.itemsize
    tok = np.concatenate([np.where(at < 0, -1, at + (ptr - base) // elem) for ptr, _, at in parts])
    return base, strides, torch.from_numpy(tok).to(chunks[0].device, non_blocking=True)


def same_strides(chunks: Sequence[Chunk]) -> bool:
    """True when ``chunks`` can share one kernel launch (:func:`cachegen_decode`)."""
    def key(c: Chunk) -> tuple[int, ...]:
        s = c.strides() if isinstance(c, KVPages) else tuple(c.stride()[k] for k in (0, 1, 3, 4))
        return (*s, c.dtype.itemsize)
    return len({key(c) for c in chunks}) <= 1


def cachegen_codes(x: Chunk, code: torch.Tensor, flag: torch.Tensor) -> None:
    """Scale codes ``[L, P, T, H]`` (int32) of a chunk into ``code``; ``flag`` (int32, zeroed) becomes 1 on
    inf/nan. No host sync."""
    layers, planes, tokens, heads, dim = x.shape
    ptr, (s0, s1, s3, s4), tok = _addressing([x])
    _check(_load().gdc_cachegen_codes(ptr, layers, planes, tokens, heads, dim, s0, s1, tok.data_ptr(), s3, s4,
                                      _dtype_code(x.dtype), code.data_ptr(), flag.data_ptr(), _stream(code)),
           "cachegen_codes")


def cachegen_base_rel(code: torch.Tensor, base: torch.Tensor, rel: torch.Tensor) -> None:
    """Codes ``[L, P, T, H]`` -> ``base`` int16 ``[L, P, H]`` and ``rel`` uint8 ``[L, P, T, H]`` (see cachegen)."""
    layers, planes, tokens, heads = code.shape
    _check(_load().gdc_cachegen_base_rel(code.data_ptr(), layers * planes, tokens, heads, base.data_ptr(),
                                         rel.data_ptr(), _stream(code)), "cachegen_base_rel")


def cachegen_quantize(x: Chunk, base: torch.Tensor, rel: torch.Tensor, sw: torch.Tensor, qmax: int,
                      q: torch.Tensor | None = None) -> torch.Tensor:
    """``q = clamp(round(x / (scale(base + rel) * sw)))`` of a ``[L, P, T, H, D]`` chunk -> int16 ``[L*P, T, H*D]``
    (into ``q`` when given)."""
    layers, planes, tokens, heads, dim = x.shape
    if q is None:
        q = torch.empty((layers * planes, tokens, heads * dim), dtype=torch.int16, device=x.device)
    ptr, (s0, s1, s3, s4), tok = _addressing([x])
    _check(_load().gdc_cachegen_quantize(ptr, layers, planes, tokens, heads, dim, s0, s1, tok.data_ptr(), s3, s4,
                                         _dtype_code(x.dtype), base.data_ptr(), rel.data_ptr(), sw.data_ptr(), qmax,
                                         q.data_ptr(), _stream(q)), "cachegen_quantize")
    return q


def cachegen_dequantize(q: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, sw: torch.Tensor, out: Chunk) -> None:
    """``out = q * scale(base + rel) * sw`` written into a ``[L, P, T, H, D]`` chunk ``out``."""
    layers, planes, tokens, heads, dim = out.shape
    ptr, (s0, s1, s3, s4), tok = _addressing([out])
    _check(_load().gdc_cachegen_dequantize(q.data_ptr(), base.data_ptr(), rel.data_ptr(), sw.data_ptr(), layers,
                                           planes, tokens, heads, dim, s0, s1, tok.data_ptr(), s3, s4,
                                           _dtype_code(out.dtype), ptr, _stream(q)), "cachegen_dequantize")


def cachegen_stats(q: torch.Tensor, cost: torch.Tensor, tables: int, alphabet: int, qmax: int, offset: int,
                   mu: torch.Tensor, tab: torch.Tensor) -> None:
    """Per-channel ``mu`` (int8 ``[R, C]``) and cheapest ``tab`` (uint8 ``[R, C]``) of ``q [R, T, C]``;
    ``cost``: int16 ``[tables * alphabet]`` padded to 8 entries."""
    rows, tokens, channels = q.shape
    _check(_load().gdc_cachegen_stats(q.data_ptr(), rows, tokens, channels, cost.data_ptr(), tables, alphabet, qmax,
                                      offset, mu.data_ptr(), tab.data_ptr(), _stream(q)), "cachegen_stats")


def cachegen_decode(words: torch.Tensor, word_end: torch.Tensor, lengths: torch.Tensor, tab: torch.Tensor,
                    mu: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, tables: DeviceTables, qmax: int,
                    offset: int, sw: torch.Tensor, group: int, outs: Sequence[Chunk]) -> torch.Tensor:
    """Fused rANS decode + dequantize + store of N chunks into ``outs`` (same shape and dtype, :func:`same_strides`;
    tensors or pages, written in place).

    Side information is stacked over the chunks; chunk ``n``'s words end at ``word_end[n]``. Returns the
    per-chunk error flags (int32 ``[N]``, nonzero: corrupt) without a host sync.
    """
    layers, planes, tokens, heads, dim = outs[0].shape
    n, streams = len(outs), lengths.numel() // len(outs)
    starts = torch.cat([word_end.new_zeros(1), word_end[:-1]])
    within = (torch.cumsum(lengths, 0, dtype=torch.int64) - lengths).view(n, streams)
    offsets = within - within[:, :1] + starts.view(n, 1)
    ptr, (s0, s1, s3, s4), tok = _addressing(outs)
    err = torch.zeros(n, dtype=torch.int32, device=outs[0].device)
    _check(_load().gdc_cachegen_decode(words.data_ptr(), word_end.data_ptr(), offsets.data_ptr(), lengths.data_ptr(), n,
                                       layers, planes, tokens, heads, dim, group, tab.data_ptr(), mu.data_ptr(),
                                       base.data_ptr(), rel.data_ptr(), *_tables(tables), qmax, offset, sw.data_ptr(),
                                       s0, s1, tok.data_ptr(), s3, s4, _dtype_code(outs[0].dtype), ptr,
                                       err.data_ptr(), _stream(words)), "cachegen_decode")
    return err


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES[dtype]
