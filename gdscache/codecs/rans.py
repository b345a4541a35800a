"""Parallel rANS entropy coder shared by the ``cachegen`` and ``lossless`` codecs.

Symbols come as ``[R, T, C]`` (rows, tokens, channels). Channels are cut into groups of ``G``;
each (row, group) is one independent stream of ``T * G`` symbols in token-major order
(symbol ``j`` is token ``j // G``, channel ``j % G`` of the group), so a GPU thread codes one
stream. Every channel names its frequency table (``tab[R, C]``); tables have ``PROB_BITS``-bit
precision.

Coder: 32-bit state in ``[2**16, 2**32)``, 16-bit renormalisation words, encoder starts at
``RANS_L``. A stream is ``[state low, state high, words...]`` as little-endian uint16, read
forward by the decoder. A correct decode ends with state ``RANS_L`` having read every word:
anything else is a malformed payload.

:func:`encode` / :func:`decode` run the CUDA kernels for CUDA tensors when the kernel library is
loaded, and the vectorised numpy reference otherwise; both produce the same bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from gdscache.codecs import _cuda

PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16


def pick_group(channels: int, preferred: int = 8) -> int:
    """Largest power of two <= ``preferred`` dividing ``channels``."""
    group = preferred
    while channels % group:
        group //= 2
    return group


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Histograms ``[N, A]`` -> frequency tables summing to ``PROB_SCALE``, each entry <= 65535.

    Present symbols keep a frequency >= 1; absent ones get 0 (never coded). Integer-only, so
    every machine builds the same table from the same counts.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum(axis=1, keepdims=True)
    if np.any(total == 0):
        raise ValueError("cannot build a frequency table from an empty histogram")
    freq = (counts * PROB_SCALE) // total
    freq = np.where((counts > 0) & (freq == 0), 1, freq)
    rows = np.arange(len(freq))
    top = freq.argmax(axis=1)
    freq[rows, top] += PROB_SCALE - freq.sum(axis=1)
    full = freq[rows, top] == PROB_SCALE  # one symbol only: lend one slot to a neighbour
    freq[rows[full], top[full]] -= 1
    freq[rows[full], (top[full] + 1) % counts.shape[1]] += 1
    return freq.astype(np.uint32)


def cumulative(freq: np.ndarray) -> np.ndarray:
    """``[N, A]`` frequencies -> ``[N, A + 1]`` cumulative starts."""
    cum = np.zeros((freq.shape[0], freq.shape[1] + 1), dtype=np.uint32)
    np.cumsum(freq, axis=1, out=cum[:, 1:])
    return cum


def _stream_tables(tab: np.ndarray, group: int, tokens: int) -> np.ndarray:
    """``[S, T*G]`` table id of every symbol of every stream."""
    streams = tab.reshape(-1, group)
    return np.tile(streams, (1, tokens))


def encode_ref(sym: np.ndarray, tab: np.ndarray, freq: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference encoder: ``(lengths uint32 [S], words uint16 [sum(lengths)])``."""
    rows_n, tokens, channels = sym.shape
    n = tokens * group
    seq = sym.reshape(rows_n, tokens, channels // group, group).transpose(0, 2, 1, 3).reshape(-1, n)
    tabseq = _stream_tables(tab, group, tokens)
    cum = cumulative(freq)
    f = freq[tabseq, seq].astype(np.uint64)
    c = cum[tabseq, seq].astype(np.uint64)
    if np.any(f == 0):
        raise ValueError("a symbol has zero frequency in its table")
    streams = seq.shape[0]
    buf = np.zeros((streams, n + 2), dtype=np.uint16)
    pos = np.full(streams, n + 1, dtype=np.int64)
    x = np.full(streams, RANS_L, dtype=np.uint64)
    rows = np.arange(streams)
    for j in range(n - 1, -1, -1):
        fj = f[:, j]
        emit = x >= (fj << np.uint64(32 - PROB_BITS))
        if emit.any():
            e = rows[emit]
            buf[e, pos[e]] = (x[e] & np.uint64(0xFFFF)).astype(np.uint16)
            pos[e] -= 1
            x[e] >>= np.uint64(16)
        x = ((x // fj) << np.uint64(PROB_BITS)) + (x % fj) + c[:, j]
    buf[rows, pos] = (x >> np.uint64(16)).astype(np.uint16)
    buf[rows, pos - 1] = (x & np.uint64(0xFFFF)).astype(np.uint16)
    start = pos - 1
    lengths = (n + 2 - start).astype(np.uint32)
    words = buf[np.arange(n + 2)[None, :] >= start[:, None]]
    return lengths, words


def decode_ref(words: np.ndarray, lengths: np.ndarray, tab: np.ndarray, freq: np.ndarray,
               shape: tuple[int, int, int], group: int) -> np.ndarray:
    """Reference decoder: symbols ``[R, T, C]`` (int32); ``ValueError`` on a malformed stream."""
    rows_n, tokens, channels = shape
    n = tokens * group
    lengths = lengths.astype(np.int64)
    _check_lengths(lengths, n, words.size)
    offs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    end = offs + lengths
    w = np.concatenate([words.astype(np.uint64), np.zeros(1, np.uint64)])
    tabseq = _stream_tables(tab, group, tokens)
    cum = cumulative(freq).astype(np.uint64)
    alphabet = freq.shape[1]
    cumflat = cum.reshape(-1)
    x = w[offs] | (w[offs + 1] << np.uint64(16))
    ptr = offs + 2
    out = np.empty((len(offs), n), dtype=np.int32)
    steps = max(1, int(np.ceil(np.log2(alphabet))))
    bad = np.zeros(len(offs), dtype=bool)
    for j in range(n):
        base = tabseq[:, j].astype(np.int64) * (alphabet + 1)
        slot = x & np.uint64(PROB_SCALE - 1)
        lo = np.zeros(len(offs), dtype=np.int64)
        hi = np.full(len(offs), alphabet, dtype=np.int64)
        for _ in range(steps):
            mid = (lo + hi) >> 1
            go = cumflat[base + mid] <= slot
            lo = np.where(go, mid, lo)
            hi = np.where(go, hi, mid)
        c = cumflat[base + lo]
        f = cumflat[base + lo + 1] - c
        x = f * (x >> np.uint64(PROB_BITS)) + slot - c
        need = x < np.uint64(RANS_L)
        bad |= need & (ptr >= end)
        take = need & (ptr < end)
        x = np.where(take, (x << np.uint64(16)) | w[np.minimum(ptr, w.size - 1)], x)
        ptr = ptr + take
        out[:, j] = lo
    if bad.any() or np.any(x != RANS_L) or np.any(ptr != end):
        raise ValueError("entropy-coded stream is corrupt (final rANS state or word count mismatch)")
    return out.reshape(rows_n, channels // group, tokens, group).transpose(0, 2, 1, 3).reshape(rows_n, tokens, channels)


def _check_lengths(lengths: np.ndarray, n: int, total: int) -> None:
    if np.any(lengths < 2) or np.any(lengths > n + 2):
        raise ValueError(f"stream lengths out of range [2, {n + 2}]")
    if int(lengths.sum()) != total:
        raise ValueError(f"stream lengths sum to {int(lengths.sum())} words, payload holds {total}")


BUCKETS = 256


def bucket_lut(freq: np.ndarray) -> np.ndarray:
    """``[N, 257]`` uint16 for the kernel's symbol lookup: entry ``b < 256`` is the last symbol starting at or
    before slot ``256 * b``, entry 256 the last coded symbol; a slot of bucket ``b`` lies in a symbol between
    entries ``b`` and ``b + 1``."""
    cum = cumulative(freq)[:, :-1]
    starts = np.arange(BUCKETS, dtype=np.int64) * (PROB_SCALE // BUCKETS)
    last = freq.shape[1] - 1 - np.argmax(freq[:, ::-1] > 0, axis=1)
    return np.stack([np.append(np.searchsorted(row, starts, side="right") - 1, end)
                     for row, end in zip(cum, last, strict=True)]).astype(np.uint16)


class DeviceTables(NamedTuple):
    """Tables packed for the kernels: one int16 buffer holding ``entry [N, A]`` as uint32
    (``cum | freq << 16``; a coded symbol's start is below 2**16) then, at ``lut_off``, the
    ``[N, 257]`` bucket lookup (:func:`bucket_lut`), each part padded to 8 entries."""

    buf: torch.Tensor
    lut_off: int
    count: int
    alphabet: int


class Tables:
    """Frequency tables on the host and, lazily, on each CUDA device the kernels use."""

    def __init__(self, freq: np.ndarray):
        self.freq = np.ascontiguousarray(freq, dtype=np.uint32)
        if self.freq.max(initial=0) >= PROB_SCALE:
            raise ValueError("every table entry must be below 2**16 (one symbol cannot hold every slot)")
        self._device: dict[torch.device, DeviceTables] = {}

    def on(self, device: torch.device) -> DeviceTables:
        """The tables packed for the kernels on ``device`` (built once per device)."""
        if device not in self._device:
            count, alphabet = self.freq.shape
            cum = cumulative(self.freq)[:, :-1] & 0xFFFF  # only uncoded trailing symbols reach 2**16
            entry = (cum | (self.freq << 16)).astype(np.uint32).reshape(-1).view(np.uint16)
            entry = np.concatenate([entry, np.zeros(-entry.size % 8, np.uint16)])
            lut = bucket_lut(self.freq).reshape(-1)
            buf = np.concatenate([entry, lut, np.zeros(-lut.size % 8, np.uint16)])
            self._device[device] = DeviceTables(torch.from_numpy(buf.view(np.int16)).to(device), entry.size, count,
                                                alphabet)
        return self._device[device]


def use_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and _cuda.available()


def encode(sym: torch.Tensor, tab: torch.Tensor, tables: Tables, group: int, mu: torch.Tensor | None = None,
           offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Code ``sym [R, T, C] - mu [R, C] + offset`` (ints, on any device) -> ``(lengths int32 [S], words int16 [W])``
    on that device."""
    if use_kernels(sym):
        return _cuda.rans_encode(sym.to(torch.int16), tab.to(torch.int32).contiguous(), tables.on(sym.device), group,
                                 None if mu is None else mu.to(torch.int8).contiguous(), offset)
    if mu is not None or offset:
        sym = sym.to(torch.int32) + offset - (0 if mu is None else mu.to(torch.int32).unsqueeze(1))
    lengths, words = encode_ref(sym.cpu().numpy().astype(np.int64), tab.cpu().numpy().astype(np.int64), tables.freq,
                                group)
    return (torch.from_numpy(lengths.view(np.int32)).to(sym.device),
            torch.from_numpy(words.view(np.int16)).to(sym.device))


def decode(words: torch.Tensor, lengths: torch.Tensor, tab: torch.Tensor, tables: Tables,
           shape: tuple[int, int, int], group: int) -> torch.Tensor:
    """Inverse of :func:`encode`: int16 ``[R, T, C]`` on ``words``' device; ``ValueError`` if malformed."""
    if use_kernels(words):
        return _cuda.rans_decode(words, lengths, tab.to(torch.int32).contiguous(), tables.on(words.device), shape,
                                 group)
    sym = decode_ref(words.cpu().numpy().view(np.uint16), lengths.cpu().numpy().view(np.uint32),
                     tab.cpu().numpy().astype(np.int64), tables.freq, shape, group)
    return torch.from_numpy(sym.astype(np.int16)).to(words.device)
