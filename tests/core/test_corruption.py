"""Damaged chunk files read as misses, never as wrong KV and never as exceptions."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

import numpy as np
import pytest
import torch
from kvtestlib import make_kv

from gdscache import GDSCache
from gdscache.api import Fetched
from gdscache.format.chunkfile import HEADER_SIZE


def _damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "payload-bitflip":
        data[HEADER_SIZE + 100] ^= 0x01
    elif how == "payload-zeroed":
        data[HEADER_SIZE:] = bytes(len(data) - HEADER_SIZE)
    elif how == "truncated":
        data = data[: HEADER_SIZE + 10]
    elif how == "header-field":
        data[60] ^= 0xFF  # payload length
    elif how == "bad-magic":
        data[0:8] = b"NOTACHNK"
    elif how == "random-bytes":
        data = bytearray(os.urandom(len(data)))
    elif how == "empty":
        data = bytearray()
    with open(path, "wb") as f:
        f.write(data)


HOWS = ["payload-bitflip", "payload-zeroed", "truncated", "header-field", "bad-magic", "random-bytes", "empty"]


@pytest.mark.parametrize("how", HOWS)
def test_damaged_chunk_is_a_miss_and_quarantined(cache_dir, how, caplog):
    kv = make_kv(2, 48, 2, 8, dtype=torch.bfloat16)
    tokens = list(range(48))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        keys = cache.chunk_keys(tokens)
    second = glob.glob(os.path.join(cache_dir, "*", keys[1].hex()[:2], keys[1].hex() + ".gdc"))
    assert len(second) == 1
    _damage(second[0], how)
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 16  # chunk 0 good, chunk 1 bad: the prefix ends there
        assert torch.equal(out[:, :, :16], kv[:, :, :16])
        assert not os.path.exists(second[0])  # moved aside
        assert cache.lookup(tokens) == 16
        assert cache.stats()["local_corrupt"] == 1
    assert glob.glob(os.path.join(cache_dir, ".quarantine", "*"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt chunk" in r.getMessage()]
    assert len(warned) == 1 and second[0] in warned[0].getMessage()


def test_chunk_file_of_another_key_is_rejected(cache_dir):
    kv = make_kv(2, 32, 2, 8)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        k0, k1 = cache.chunk_keys(tokens)
        p0, p1 = (cache._local.path_of(cache.namespace, k) for k in (k0, k1))
    os.replace(p0, p1 + ".x")
    os.replace(p1, p0)
    os.replace(p1 + ".x", p1)  # chunks swapped: each file now holds the other key
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 0


def test_header_written_with_other_codec_settings_is_a_miss(cache_dir):
    """A file whose header names other settings than the namespace promises is never decoded."""
    from gdscache.format.chunkfile import pack_header, unpack_header

    kv = make_kv(2, 16, 2, 8)
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(list(range(16)), kv)
        path = cache._local.path_of(cache.namespace, cache.chunk_keys(list(range(16)))[0])
    with open(path, "r+b") as f:
        meta = dataclasses.replace(unpack_header(f.read(HEADER_SIZE)), codec="cachegen")
        f.seek(0)
        f.write(pack_header(meta))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        assert cache.retrieve(list(range(16)), torch.zeros_like(kv)) == 0


def test_batched_read_tells_each_chunk_apart(cache_dir):
    # one batched read: good chunks come back verified, each kind of damage is a miss of its own chunk only
    kv = make_kv(2, 6 * 16, 2, 8, dtype=torch.bfloat16)
    tokens = list(range(kv.shape[2]))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        keys = cache.chunk_keys(tokens)
        local, ns, cpu = cache._local, cache.namespace, torch.device("cpu")
        paths = [local.path_of(ns, key) for key in keys]
        singles = [local.read(ns, key, cpu) for key in keys]
        reads = local.stats.reads
        whole = local.start_read_many(ns, keys, cpu)()  # every chunk holds: their payloads as rows of one view too
        assert local.stats.reads == reads + 6 and list(local._index)[-6:] == keys  # counted, most recently used
        assert whole.payloads is not None and len(whole.payloads) == 6
        assert all(torch.equal(whole.payloads.stack[k], singles[k][1]) for k in range(6))
        assert whole.metas == [meta for meta, _ in singles] and len(whole.hits) == 6  # each hit made when asked for
        assert all(meta == singles[k][0] and torch.equal(payload, singles[k][1])
                   for k, (meta, payload) in enumerate(whole.hits))
        assert [meta for meta, _ in whole.hits[-2:]] == whole.metas[4:] and whole.hits[-1][0] == singles[5][0]
        _damage(paths[1], "payload-bitflip")  # every file read whole, of one length: checked together, then each
        read = local.start_read_many(ns, keys, cpu)()
        assert [hit is not None for hit in read.hits] == [True, False, True, True, True, True]
        assert read.payloads is None and torch.equal(read.hits[2][1], singles[2][1])
        _damage(paths[2], "truncated")
        os.unlink(paths[3])
        with open(paths[0], "rb") as src, open(paths[4], "wb") as dst:  # another key's file under this name
            dst.write(src.read())
        read = local.start_read_many(ns, keys, cpu)()
        got = read.hits
        assert [hit is not None for hit in got] == [True, False, False, False, False, True] and read.payloads is None
        for k in (0, 5):
            meta, payload = got[k]
            assert meta.key == keys[k] and meta.payload_digest == singles[k][0].payload_digest
            assert torch.equal(payload, singles[k][1])
        stats = cache.stats()
        assert stats["local_corrupt"] == 3 and stats["local_read_misses"] == 2  # 1 quarantined, then missing
        assert not any(os.path.exists(paths[k]) for k in (1, 2, 3, 4))
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out) == 16
        assert torch.equal(out[:, :, :16], kv[:, :, :16])


@pytest.mark.parametrize("trouble", ["none", "decode-error", "other-settings"])
def test_a_batch_read_whole_counts_only_chunks_in_place(cache_dir, monkeypatch, trouble):
    """A batch read whole goes on with no payload per chunk (``payload`` None is what a decoded chunk has): a chunk
    that then fails to decode, or was written with other settings, must get its payload back and end the prefix
    there, never count as in place. Driven on CPU tensors through the steps a GPU retrieve takes."""
    kv = make_kv(2, 3 * 16, 2, 8, dtype=torch.bfloat16)
    tokens = list(range(kv.shape[2]))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        keys = cache.chunk_keys(tokens)
        out = torch.zeros_like(kv)
        _, spec = cache._prepare(tokens, out, "out")
        read = cache._local.start_read_many(cache.namespace, keys, torch.device("cpu"))()
        assert read.payloads is not None and read.metas is not None
        metas = list(read.metas)
        if trouble == "other-settings":
            metas[1] = dataclasses.replace(metas[1], codec_params={"bits": 3})
        decode_many = cache._codec.decode_many
        second = read.payloads.stack[1].data_ptr()

        def failing(payloads, spec, num_tokens, outs):  # chunk 1 writes garbage and says it failed
            errors = decode_many(payloads, spec, num_tokens, outs)
            for k, payload in enumerate(payloads):
                if payload.data_ptr() == second:
                    outs[k].fill_(float("nan"))
                    errors[k] = "bad stream"
            return errors

        if trouble == "decode-error":
            monkeypatch.setattr(cache._codec, "decode_many", failing)
        found = [Fetched(meta, None, True) for meta in metas]
        decoded = cache._decode_here(found, cache._chunk_views(out, 0, 3), spec, None, read.payloads)
        if trouble != "none":
            assert decoded[1].payload is not None and torch.equal(decoded[1].payload, read.payloads.stack[1])
        done = cache._decode_prefix(decoded, spec, out, 0)
        assert done == (3 if trouble == "none" else 1)
        assert torch.equal(out[:, :, : done * 16], kv[:, :, : done * 16])


def test_a_stray_file_of_absurd_size_is_a_miss_without_claiming_memory(cache_dir):
    kv = make_kv(2, 32, 2, 8)
    tokens = list(range(32))
    with GDSCache(path=cache_dir, chunk_size=16, model_id="m") as cache:
        cache.store(tokens, kv)
        keys = cache.chunk_keys(tokens)
        path = cache._local.path_of(cache.namespace, keys[1])
        os.truncate(path, 1 << 40)  # sparse: a TiB of nothing after a valid header (no allocation could hold it)
        got = cache._local.read_many(cache.namespace, keys, torch.device("cpu"))
        assert got[0] is not None and got[1] is None
        assert cache.stats()["local_corrupt"] == 1 and not os.path.exists(path)


@pytest.mark.parametrize("params", [{}, {"bits": 4, "groups": [3, 1], "nested": {"z": 1, "a": 2.5}},
                                    {"a": 1, "created": 3.5, "spec": {"created": 2}}])
def test_header_bytes_follow_the_format(params):
    """docs/FORMAT.md: fixed fields, then the metadata as compact JSON with sorted keys, zeros to 4 KiB, and a CRC-32
    of the whole header taken with its own field zeroed (the packer builds the JSON from cached pieces)."""
    import json
    import struct
    import zlib

    from gdscache.format.chunkfile import ChunkMeta, pack_header, unpack_header
    from gdscache.spec import KVSpec

    spec = KVSpec(4, 2, 8, 128, torch.bfloat16)
    for created in (1764340000.123456, 0.1, 1e300, np.float64(2.5), 7, float("inf")):
        meta = ChunkMeta(b"k" * 16, b"n" * 16, spec, 256, "cachegen", params, 1 << 20, 2, b"d" * 24, created)
        header = pack_header(meta)
        blob = json.dumps({"spec": spec.to_json(), "codec": "cachegen", "codec_params": params, "created": created},
                          sort_keys=True, separators=(",", ":")).encode()
        fixed = struct.calcsize("<8sHIH16s16sQQII24s")
        assert len(header) == HEADER_SIZE
        assert header[fixed : fixed + len(blob)] == blob
        assert header[fixed + len(blob) :] == bytes(HEADER_SIZE - fixed - len(blob))
        assert struct.unpack_from("<I", header, 10)[0] == zlib.crc32(header[:10] + bytes(4) + header[14:])
        assert unpack_header(header) == meta


def test_a_header_read_again_is_checked_against_its_file_again():
    """Headers are parsed once per distinct bytes; what depends on the file (its size) and any changed byte is
    still checked on every read, and a parsed header cannot be changed in place."""
    from gdscache.format.chunkfile import ChunkMeta, CorruptChunk, pack_header, unpack_header
    from gdscache.spec import KVSpec

    meta = ChunkMeta(b"k" * 16, b"n" * 16, KVSpec(4, 2, 8, 128, torch.bfloat16), 256, "raw", {}, 1 << 20, 2,
                     b"d" * 24, 1.5)
    header = pack_header(meta)
    assert unpack_header(header, HEADER_SIZE + (1 << 20)) == meta
    assert unpack_header(bytearray(header), HEADER_SIZE + (1 << 20)) == meta
    with pytest.raises(CorruptChunk, match="truncated"):
        unpack_header(header, HEADER_SIZE + (1 << 20) - 1)
    flipped = bytearray(header)
    flipped[200] ^= 1
    with pytest.raises(CorruptChunk, match="checksum"):
        unpack_header(bytes(flipped))
    assert unpack_header(header) == meta  # the damaged bytes replaced nothing kept
    rewritten = dataclasses.replace(meta, created=2.5, payload_len=1 << 19)  # the same key, written again
    assert unpack_header(pack_header(rewritten)) == rewritten
    with pytest.raises(CorruptChunk, match="checksum"):
        unpack_header(bytes(flipped))
    with pytest.raises(dataclasses.FrozenInstanceError):
        unpack_header(header).codec = "cachegen"


def _with_created(header: bytes, text: bytes) -> bytes:
    """``header`` with the text of its ``created`` value replaced, its metadata length and CRC-32 made right again."""
    import struct
    import zlib

    at = header.rindex(b',"created":') + len(b',"created":')
    end = header.index(b',"spec":', at)
    changed = bytearray(header[:at] + text + header[end:])[:HEADER_SIZE]
    changed += bytes(HEADER_SIZE - len(changed))
    meta_len_at = struct.calcsize("<8sHIH16s16sQQI")
    (meta_len,) = struct.unpack_from("<I", header, meta_len_at)
    struct.pack_into("<I", changed, meta_len_at, meta_len + len(text) - (end - at))
    struct.pack_into("<I", changed, 10, 0)
    struct.pack_into("<I", changed, 10, zlib.crc32(changed))
    return bytes(changed)


def test_metadata_known_from_other_chunks_is_still_read_exactly(monkeypatch):
    """The JSON around ``created`` is parsed once per distinct settings (a float written as the packer writes it is
    all that is parsed of the next chunks'); each header's own ``created`` is still read as written, and a header
    that is not JSON as written is still corrupt."""
    import json
    import types

    from gdscache.format import chunkfile
    from gdscache.format.chunkfile import ChunkMeta, CorruptChunk, pack_header, unpack_header
    from gdscache.spec import KVSpec

    decoded = []
    counting = types.SimpleNamespace(loads=lambda text: decoded.append(text) or json.loads(text))
    monkeypatch.setattr(chunkfile, "json", counting)  # chunkfile's json only

    spec = KVSpec(4, 2, 8, 128, torch.bfloat16)
    params = {"a": 1, "created": 3.5}
    meta = ChunkMeta(b"m" * 16, b"n" * 16, spec, 256, "raw", params, 1 << 20, 2, b"d" * 24, 1.25)
    header = pack_header(meta)
    assert unpack_header(header) == meta
    for text, created, parsed in ((b"1.5", 1.5, 0), (b"1.50", 1.5, 1), (b" 1.5", 1.5, 1), (b"7", 7, 1),
                                  (b"1e300", 1e300, 1), (b"1e+300", 1e300, 0), (b"Infinity", float("inf"), 1)):
        decoded.clear()
        got = unpack_header(_with_created(header, text))
        assert got == dataclasses.replace(meta, created=created) and type(got.created) is type(created), text
        assert len(decoded) == parsed, text
    for text in (b"1_5", b"inf", b"nan", b"1.5,\"x\":"):  # float() takes the first three, JSON none
        with pytest.raises(CorruptChunk, match="metadata"):
            unpack_header(_with_created(header, text))
    other = dataclasses.replace(meta, codec_params={"a": 2, "created": 3.5})  # one byte apart: settings of its own
    assert unpack_header(_with_created(pack_header(other), b"2.5")) == dataclasses.replace(other, created=2.5)


def test_headers_of_a_batch_are_each_checked_for_their_own_key_and_file():
    """``unpack_headers``: one compare where every header was parsed before; otherwise each row on its own, with the
    same answers as ``unpack_header`` plus its key and its file's size."""
    from gdscache.format.chunkfile import ChunkMeta, CorruptChunk, pack_header, unpack_header, unpack_headers
    from gdscache.spec import KVSpec

    spec = KVSpec(4, 2, 8, 128, torch.bfloat16)
    metas = [ChunkMeta(bytes([65 + k]) * 16, b"n" * 16, spec, 256, "raw", {}, 1 << 20, 2, bytes([k]) * 24, 1.0 + k)
             for k in range(5)]
    keys = [m.key for m in metas]
    heads = np.frombuffer(b"".join(pack_header(m) for m in metas), dtype=np.uint8).reshape(5, HEADER_SIZE).copy()
    size = HEADER_SIZE + (1 << 20)
    assert unpack_headers(keys, heads, [size] * 5) == metas  # parsed now, row by row
    assert unpack_headers(keys, heads, [size] * 5) == metas  # kept: each row compared in place
    kept = unpack_headers(keys, heads, [size, size, size, size - 1, size])  # kept, but one file is short
    assert kept[:3] + kept[4:] == metas[:3] + metas[4:] and isinstance(kept[3], CorruptChunk)
    heads[1, 200] ^= 1  # damaged header bytes
    heads[2] = heads[0]  # another key's header
    sizes = [size, size, size, size - 1, -1]  # a truncated file; one that could not be opened
    got = unpack_headers(keys, heads, sizes)
    assert got[0] == metas[0]
    assert [str(e) for e in got[1:]] == ["header checksum mismatch", "file holds another key",
                                        f"truncated: {size - 1} bytes, header promises {size}",
                                        f"truncated: -1 bytes, header promises {size}"]
    assert all(isinstance(e, CorruptChunk) for e in got[1:])
    heads[1, 200] ^= 1
    assert unpack_headers(keys[:2], heads[:2], [size] * 2) == metas[:2]  # the damage replaced nothing kept
    assert unpack_header(heads[1].tobytes(), size) == metas[1]


def test_a_batch_read_whole_still_checks_each_chunk_on_its_own():
    """``LocalTier._verified`` takes a batch of one payload length at once only where every file was read and every
    payload fills its row: a read that failed after its header, or a header promising less than its file holds, is
    still a miss of its own chunk."""
    from gdscache.format.checksum import HALFSUM3, digest
    from gdscache.format.chunkfile import ChunkMeta, CorruptChunk, pack_header
    from gdscache.spec import KVSpec
    from gdscache.tiers.local import LocalTier
    from io_backends.base import FilesRead, Rows

    spec, length = KVSpec(4, 2, 8, 128, torch.bfloat16), 8192
    stack = torch.randint(0, 256, (3, length), dtype=torch.uint8)
    keys = [bytes([70 + k]) * 16 for k in range(3)]

    def meta(k: int, payload_len: int = length) -> ChunkMeta:
        return ChunkMeta(keys[k], b"n" * 16, spec, 256, "raw", {}, payload_len, HALFSUM3,
                         digest(stack[k, :payload_len], HALFSUM3), 1.0 + k)

    def verified(metas: list[ChunkMeta], errors: list[OSError | None]) -> list[object]:
        heads = np.frombuffer(b"".join(pack_header(m) for m in metas), dtype=np.uint8).reshape(3, HEADER_SIZE)
        read = FilesRead(heads.copy(), Rows(stack), [HEADER_SIZE + length] * 3, errors)
        outcome, rows = LocalTier._verified(keys, read)
        assert (rows is not None) == all(isinstance(got, tuple) for got in outcome)
        return outcome

    whole = verified([meta(k) for k in range(3)], [None] * 3)
    assert [got[0] for got in whole] == [meta(k) for k in range(3)]
    assert all(torch.equal(whole[k][1], stack[k]) for k in range(3))
    failed = OSError(5, "a read that failed after its header")
    got = verified([meta(k) for k in range(3)], [None, failed, None])
    assert got[1] is failed and isinstance(got[0], tuple) and isinstance(got[2], tuple)
    got = verified([meta(0), meta(1), meta(2, length - 4096)], [None] * 3)  # its digest holds for what it promises
    assert isinstance(got[2], CorruptChunk) and "holds no 4096-byte payload" in str(got[2])
    assert isinstance(got[0], tuple) and isinstance(got[1], tuple)
    got = verified([meta(k, length - 4096) for k in range(3)], [None] * 3)  # all alike: one length, rows too wide
    assert all(isinstance(e, CorruptChunk) and "holds no 4096-byte payload" in str(e) for e in got)


def test_headers_kept_are_bounded_first_in_first_out(monkeypatch):
    """At most ``_PARSED_HEADERS`` headers are kept, the first kept going first; one no longer kept, or kept for
    another header of its key, is parsed again, with the same answer."""
    import collections

    from gdscache.format import chunkfile
    from gdscache.format.chunkfile import ChunkMeta, pack_header, unpack_header
    from gdscache.spec import KVSpec

    monkeypatch.setattr(chunkfile, "_PARSED_HEADERS", 3)
    monkeypatch.setattr(chunkfile, "_parsed", {})
    monkeypatch.setattr(chunkfile, "_parsed_order", collections.deque())
    spec = KVSpec(4, 2, 8, 128, torch.bfloat16)
    metas = [ChunkMeta(bytes([80 + k]) * 16, b"n" * 16, spec, 256, "raw", {}, 1 << 20, 2, b"d" * 24, 1.0 + k)
             for k in range(5)]
    for meta in metas:
        assert unpack_header(pack_header(meta)) == meta
    assert list(chunkfile._parsed) == list(chunkfile._parsed_order) == [m.key for m in metas[2:]]
    assert unpack_header(pack_header(metas[0])) == metas[0]  # parsed again, and kept: the oldest goes
    assert list(chunkfile._parsed_order) == [m.key for m in (metas[3], metas[4], metas[0])]
    assert sorted(chunkfile._parsed) == sorted(chunkfile._parsed_order)
    again = dataclasses.replace(metas[3], created=9.5)  # its key written again: kept in its place, not added
    assert unpack_header(pack_header(again)) == again
    assert list(chunkfile._parsed_order) == [m.key for m in (metas[3], metas[4], metas[0])]
    assert len(chunkfile._parsed) == 3
    assert chunkfile._parsed[metas[3].key][1] == again
