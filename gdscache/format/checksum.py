"""Payload checksums, computed where the payload lives.

Two algorithms, named in every chunk header:

- ``xxh3_64``: xxHash3 of the bytes; fast on the CPU, used for payloads in host memory.
- ``halfsum3``: three position-weighted sums over the payload's 16-bit little-endian words
  (weights ``i mod 65521 + 1`` and ``i mod 65519 + 1``), all in int64 without overflow for
  payloads below 4 GiB. One CUDA kernel (cuda/, exact integer sums) computes it next to a GPUDirect
  read with no copy to the host; torch computes the same value anywhere else.

Either reader can check either algorithm; the writer picks the one that suits its device.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import struct
from collections.abc import Sequence

import torch
import xxhash

from gdscache.codecs import _cuda  # the CUDA kernel library (cuda/), also home of the halfsum3 kernel
from gdscache.pages import stacked_view
from io_backends.base import SharedPool

XXH3_64 = 1
HALFSUM3 = 2
NAMES = {XXH3_64: "xxh3_64", HALFSUM3: "halfsum3"}
DIGEST_SIZE = 24
_MAX_HALFSUM_BYTES = 1 << 32
_MAX_ROWS = 65535
"""Most payloads one batched halfsum3 launch takes (its grid's second dimension)."""


def _update(h: xxhash.xxh3_64, runs: Sequence[torch.Tensor]) -> None:
    for run in runs:
        h.update(memoryview(run.cpu().numpy()))  # xxhash releases the GIL while it hashes


def xxh3_digest(runs: Sequence[torch.Tensor]) -> bytes:
    h = xxhash.xxh3_64()
    _update(h, runs)
    return h.digest().ljust(DIGEST_SIZE, b"\0")


def _weighted_sum(words: torch.Tensor, period: int, start: int) -> torch.Tensor:
    """``Σ words[j] * ((start + j) mod period + 1)`` as int64, via column sums of a (rows, period) view."""
    weights = (torch.arange(period, device=words.device, dtype=torch.int64) + start) % period + 1
    body = words.numel() // period * period
    total = (words[body:].to(torch.int64) * weights[: words.numel() - body]).sum()
    if body:
        total = total + (words[:body].view(-1, period).sum(dim=0, dtype=torch.int64) * weights).sum()
    return total


def halfsum3_digest(runs: Sequence[torch.Tensor]) -> bytes:
    if sum(r.numel() for r in runs) >= _MAX_HALFSUM_BYTES:
        raise ValueError("halfsum3 covers payloads below 4 GiB")
    if any(r.numel() % 2 for r in runs[:-1]):  # word boundaries would straddle runs
        runs = [torch.cat([r.reshape(-1) for r in runs])]
    runs = [torch.cat([r, r.new_zeros(1)]) if r.numel() % 2 else r for r in runs]
    if runs and all(r.is_cuda and r.data_ptr() % 2 == 0 for r in runs) and _cuda.available():
        totals = torch.zeros(3, dtype=torch.int64, device=runs[0].device)
        start = 0
        for run in runs:  # one kernel per run, one host sync for the digest
            _cuda.halfsum3(run.view(torch.int16), start, totals)
            start += run.numel() // 2
        return struct.pack("<3q", *totals.tolist())
    sums = []
    start = 0
    for run in runs:
        words = run.view(torch.int16).to(torch.int32) & 0xFFFF
        sums += [words.sum(dtype=torch.int64), _weighted_sum(words, 65521, start), _weighted_sum(words, 65519, start)]
        start += words.numel()
    totals = torch.stack(sums).view(-1, 3).sum(dim=0) if sums else torch.zeros(3, dtype=torch.int64)
    return struct.pack("<3q", *totals.tolist())


def digests(payloads: Sequence[torch.Tensor], algorithms: Sequence[int]) -> list[bytes]:
    """The digest of each 1-D uint8 payload under its algorithm. GPU ``halfsum3`` payloads share one host sync, and
    one kernel launch where they are slices of one buffer of one length, evenly spaced (a batched read's)."""
    rows = _halfsum3_rows(payloads, algorithms)
    if rows is not None:
        totals = torch.zeros(rows.shape[0], 3, dtype=torch.int64, device=rows.device)
        _cuda.halfsum3_rows(rows, totals)
        packed = totals.cpu().numpy().astype("<i8", copy=False).tobytes()  # each row's digest, as struct packs it
        return [packed[k : k + DIGEST_SIZE] for k in range(0, len(packed), DIGEST_SIZE)]
    out = [b""] * len(payloads)
    together = [i for i, (p, alg) in enumerate(zip(payloads, algorithms, strict=True))
                if alg == HALFSUM3 and p.is_cuda and p.data_ptr() % 2 == 0 and p.numel() % 2 == 0
                and p.numel() < _MAX_HALFSUM_BYTES]
    if len(together) > 1 and _cuda.available():
        totals = torch.zeros(len(together), 3, dtype=torch.int64, device=payloads[together[0]].device)
        for row, i in enumerate(together):
            _cuda.halfsum3(payloads[i].view(torch.int16), 0, totals[row])
        for i, sums in zip(together, totals.tolist(), strict=True):
            out[i] = struct.pack("<3q", *sums)
    for i, (payload, alg) in enumerate(zip(payloads, algorithms, strict=True)):
        if not out[i]:
            out[i] = digest(payload, alg)
    return out


def _halfsum3_rows(payloads: Sequence[torch.Tensor], algorithms: Sequence[int]) -> torch.Tensor | None:
    """The payloads as one ``[n, words]`` int16 view for one halfsum3 launch, checked as a whole (a check per payload
    costs more than the kernel): all ``halfsum3``, on a GPU, of one even length, evenly spaced in one buffer; else
    None."""
    if not 1 < len(payloads) <= _MAX_ROWS or any(alg != HALFSUM3 for alg in algorithms) or not _cuda.available():
        return None
    stacked = stacked_view(payloads)
    if stacked is None or not stacked.is_cuda or stacked.dim() != 2 or stacked.dtype != torch.uint8 or \
            stacked.shape[1] % 2 or stacked.shape[1] >= _MAX_HALFSUM_BYTES or stacked.stride(0) % 2 or \
            stacked.stride(1) != 1 or stacked.data_ptr() % 2:
        return None
    return stacked.view(torch.int16)


def digest_runs(runs: Sequence[torch.Tensor], algorithm: int) -> bytes:
    """The digest of the concatenation of 1-D uint8 ``runs`` (one payload split across buffers)."""
    if algorithm == XXH3_64:
        return xxh3_digest(runs)
    if algorithm == HALFSUM3:
        return halfsum3_digest(runs)
    raise ValueError(f"unknown checksum algorithm {algorithm}")


def digest(payload: torch.Tensor, algorithm: int) -> bytes:
    """The ``DIGEST_SIZE``-byte digest of a 1-D uint8 payload under ``algorithm``."""
    return digest_runs([payload], algorithm)


def algorithm_for(payload: torch.Tensor) -> int:
    """The algorithm a writer uses for a payload on this device."""
    return HALFSUM3 if payload.is_cuda else XXH3_64


_hash_pool = SharedPool(max(4, os.cpu_count() or 1), "gdscache-hash")


class PipelinedDigest:
    """The digest of a payload that arrives piece by piece, each piece hashed on a helper thread.

    ``feed`` pieces in payload order: an ``xxh3_64`` piece is hashed while the caller reads the next
    one, so only the last piece's hashing adds to a read. ``halfsum3`` pieces are hashed at the end.
    A fed piece must not change until the next ``feed`` or ``digest`` returns.
    """

    def __init__(self, algorithm: int) -> None:
        if algorithm not in NAMES:
            raise ValueError(f"unknown checksum algorithm {algorithm}")
        self._algorithm = algorithm
        self._xxh = xxhash.xxh3_64() if algorithm == XXH3_64 else None
        self._held: list[torch.Tensor] = []
        self._job: cf.Future[None] | None = None

    def feed(self, runs: Sequence[torch.Tensor], *, overlap: bool = True) -> None:
        """Hash the next piece: on a helper thread, or here when nothing follows it to overlap with."""
        if self._xxh is None:
            self._held.extend(runs)
            return
        self.wait()  # pieces are hashed in order
        if overlap:
            self._job = _hash_pool.get().submit(_update, self._xxh, list(runs))
        else:
            _update(self._xxh, runs)

    def digest(self) -> bytes:
        """Wait for the pieces fed so far and return their digest."""
        if self._xxh is None:
            return digest_runs(self._held, self._algorithm)
        self.wait()
        return self._xxh.digest().ljust(DIGEST_SIZE, b"\0")

    def wait(self) -> None:
        """Wait for the piece being hashed, if any (its errors are raised)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()
