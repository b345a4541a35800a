"""Payloads read in pieces (each verified while the next is read) and headers written with the payload."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from kvtestlib import make_kv

import gdscache.tiers.local as local_tier
from gdscache import GDSCache
from gdscache.format import checksum
from gdscache.format.chunkfile import HEADER_SIZE, unpack_header
from io_backends.base import ALIGN, Part
from io_backends.buffers import aligned_empty, host_pool
from io_backends.posix import PosixBackend

PIECE = 3 * ALIGN  # cuts the 8 KiB (layer, K/V) runs of the KV below mid-run


def _kv() -> torch.Tensor:
    return make_kv(2, 32, 4, 64, dtype=torch.bfloat16)  # 16-token chunks of 64 KiB, runs of 8 KiB


@pytest.mark.parametrize("algorithm", [checksum.XXH3_64, checksum.HALFSUM3])
def test_pipelined_digest_of_pieces_equals_the_whole(algorithm):
    runs = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (5000, 12288, 3, 40000)]
    pieces = local_tier.split_pieces(runs, PIECE)
    assert [r.numel() for p in pieces for r in p] and all(sum(r.numel() for r in p) == PIECE for p in pieces[:-1])
    assert torch.equal(torch.cat([r for p in pieces for r in p]), torch.cat(runs))
    digest = checksum.PipelinedDigest(algorithm)
    for i, piece in enumerate(pieces):
        digest.feed(piece, overlap=i + 1 < len(pieces))
    assert digest.digest() == checksum.digest_runs(runs, algorithm)


@pytest.mark.parametrize("codec", ["raw", "lossless"])
@pytest.mark.parametrize("where", ["first piece", "middle piece", "last byte"])
def test_damage_in_any_piece_is_a_miss(cache_dir, monkeypatch, codec, where):
    monkeypatch.setattr(local_tier, "PIECE_BYTES", PIECE)
    kv = _kv()
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", codec=codec) as cache:
        cache.store(tokens, kv)
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 32  # several pieces per chunk, all verified
        assert torch.equal(out, kv)
        key = cache.chunk_keys(tokens)[1].hex()
    (path,) = glob.glob(os.path.join(cache_dir, "*", key[:2], key + ".gdc"))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    payload_len = unpack_header(bytes(data[:HEADER_SIZE])).payload_len  # the file may end in O_DIRECT padding
    at = {"first piece": 10, "middle piece": PIECE + 10, "last byte": payload_len - 1}[where]
    assert payload_len > 2 * PIECE
    data[HEADER_SIZE + at] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m", codec=codec) as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 16
        assert torch.equal(out[:, :, :16], kv[:, :, :16])
        assert cache.stats()["local_corrupt"] == 1


@pytest.mark.parametrize("o_direct", ["auto", "off"])
def test_byte_string_parts_go_out_with_the_buffers_after_them(tmp_path, o_direct):
    header = os.urandom(ALIGN)
    body = aligned_empty(4 * ALIGN)
    body.copy_(torch.randint(0, 256, (4 * ALIGN,), dtype=torch.uint8))
    tail = os.urandom(100)
    path = str(tmp_path / "f")
    backend = PosixBackend(threads=1, o_direct=o_direct)
    try:
        backend.write_file(path, [Part(5 * ALIGN, tail), Part(0, header), Part(ALIGN, body)])
    finally:
        backend.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[:ALIGN] == header
    assert data[ALIGN : 5 * ALIGN] == body.numpy().tobytes()
    assert data[5 * ALIGN : 5 * ALIGN + 100] == tail
    assert not set(data[5 * ALIGN + 100 :]) - {0}  # O_DIRECT pads the last block with zeros
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("o_direct", ["auto", "off"])
def test_runs_off_a_page_boundary_and_gaps_are_written_exactly(tmp_path, o_direct):
    # torch's CPU tensors start 64 bytes past a page: with O_DIRECT the file is assembled in one aligned copy
    buf = aligned_empty(3 * ALIGN + 64)
    buf.copy_(torch.randint(0, 256, (3 * ALIGN + 64,), dtype=torch.uint8))
    kv = buf[64:]
    assert kv.data_ptr() % ALIGN == 64
    header = os.urandom(ALIGN)
    path = str(tmp_path / "g")
    dirty = host_pool.acquire(5 * ALIGN)  # the pool hands this buffer out again, full of 0xFF
    dirty.fill_(255)
    host_pool.release(dirty)
    backend = PosixBackend(threads=1, o_direct=o_direct)
    try:
        backend.write_file(path, [Part(0, header), Part(ALIGN, kv[:ALIGN]), Part(3 * ALIGN, kv[ALIGN:])])
    finally:
        backend.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[:ALIGN] == header and data[ALIGN : 2 * ALIGN] == kv[:ALIGN].numpy().tobytes()
    assert not set(data[2 * ALIGN : 3 * ALIGN]) - {0}  # the gap reads as zeros, whatever the pooled buffer held
    assert data[3 * ALIGN : 5 * ALIGN] == kv[ALIGN:].numpy().tobytes()


def test_digests_of_many_payloads_match_one_by_one():
    from gdscache.format import checksum

    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
                for n in (4096, 1001, 0, 70000)]
    algs = [checksum.HALFSUM3, checksum.XXH3_64, checksum.HALFSUM3, checksum.HALFSUM3]
    assert checksum.digests(payloads, algs) == [checksum.digest(p, a) for p, a in zip(payloads, algs)]
    assert checksum.digests([], []) == []
