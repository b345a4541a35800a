"""The chunk file: a 4 KiB header, then the payload on a 4 KiB boundary. See docs/FORMAT.md.

The same bytes are a file in the local tier and an object in the remote tier.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gdscache.format import checksum
from gdscache.spec import KVSpec
from io_backends.base import ForkSafeLock

MAGIC = b"GDSCHUNK"
VERSION = 1
HEADER_SIZE = 4096
PAYLOAD_OFFSET = HEADER_SIZE
MAX_PAYLOAD = 1 << 32
"""Payloads are below 4 GiB (the range of the ``halfsum3`` checksum; a chunk is far smaller)."""
# magic, version, header crc32, checksum algorithm, key, namespace, payload offset, payload length,
# tokens, metadata length, payload digest
_FIXED = struct.Struct("<8sHIH16s16sQQII24s")
_CRC_OFFSET = 10
_MAX_META = HEADER_SIZE - _FIXED.size


class CorruptChunk(ValueError):
    """A chunk file or object that fails validation: the caller treats it as a miss."""


@dataclass(frozen=True)
class ChunkMeta:
    """Everything the header says about one chunk."""

    key: bytes
    namespace: bytes
    spec: KVSpec
    num_tokens: int
    codec: str
    codec_params: dict[str, Any]
    payload_len: int
    checksum_alg: int
    payload_digest: bytes
    created: float = field(default_factory=time.time)

    @property
    def file_size(self) -> int:
        return PAYLOAD_OFFSET + self.payload_len


def pack_header(meta: ChunkMeta) -> bytes:
    """The 4 KiB header for ``meta``."""
    before, after = _metadata_around_created(meta.spec, meta.codec, _dumps(meta.codec_params))
    created = meta.created
    created = float.__repr__(created) if isinstance(created, float) and math.isfinite(created) else _dumps(created)
    blob = before + created.encode() + after
    if len(blob) > _MAX_META:
        raise ValueError(f"chunk metadata is {len(blob)} bytes; at most {_MAX_META} fit in the header")
    header = bytearray(HEADER_SIZE)
    _FIXED.pack_into(
        header, 0, MAGIC, VERSION, 0, meta.checksum_alg, meta.key, meta.namespace, PAYLOAD_OFFSET,
        meta.payload_len, meta.num_tokens, len(blob), meta.payload_digest,
    )
    header[_FIXED.size : _FIXED.size + len(blob)] = blob
    struct.pack_into("<I", header, _CRC_OFFSET, zlib.crc32(header))
    return bytes(header)


_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


@functools.lru_cache(maxsize=64)
def _metadata_around_created(spec: KVSpec, codec: str, codec_params: str) -> tuple[bytes, bytes]:
    """The header's metadata JSON (keys sorted) before and after the value of ``created``, the one field that
    differs between the chunks of one cache: the rest is encoded once, not per chunk."""
    before = f'{{"codec":{_dumps(codec)},"codec_params":{codec_params},"created":'
    return before.encode(), f',"spec":{_dumps(spec.to_json())}}}'.encode()


def unpack_header(header: bytes, file_size: int | None = None) -> ChunkMeta:
    """Parse and validate a header; raises :class:`CorruptChunk` naming what is wrong.

    The header last parsed for each key is kept with what it says, for up to ``_PARSED_HEADERS`` keys (the first
    kept go first): the same bytes again are not parsed again (a published chunk file never changes, and warm reads
    read the same headers again and again)."""
    if len(header) < HEADER_SIZE:
        raise CorruptChunk(f"header is {len(header)} bytes, expected {HEADER_SIZE}")
    header = bytes(header[:HEADER_SIZE])
    key = header[_KEY_AT : _KEY_AT + 16]
    known = _parsed.get(key)
    meta = known[1] if known is not None and known[0] == header else _parse_new(key, header)  # a compare of bytes
    if file_size is not None and file_size < PAYLOAD_OFFSET + meta.payload_len:
        raise _truncated(meta, file_size)
    return meta


def unpack_headers(keys: Sequence[bytes], heads: np.ndarray, sizes: Sequence[int]) -> list[ChunkMeta | CorruptChunk]:
    """:func:`unpack_header` of each row of ``heads`` (``[n, HEADER_SIZE]`` uint8) with its file's size, or the
    :class:`CorruptChunk` it raised; a header that holds another key than its row's in ``keys`` is corrupt too.
    Where every row holds the header last parsed for its key, a compare of each row's bytes checks them."""
    if heads.shape != (len(keys), HEADER_SIZE) or heads.dtype != np.uint8:
        raise ValueError(f"heads must be [{len(keys)}, {HEADER_SIZE}] uint8, got {list(heads.shape)} {heads.dtype}")
    data = heads.tobytes()
    known = [_parsed.get(key) for key in keys]
    kept = [header for header, _ in known] if None not in known else []
    if kept and all(map(data.startswith, kept, range(0, len(data), HEADER_SIZE))):  # each row compared in place
        metas: list[ChunkMeta | CorruptChunk] = [meta for _, meta in known]
    else:
        metas = [_unpack_or_error(data[i * HEADER_SIZE : (i + 1) * HEADER_SIZE]) for i in range(len(keys))]
    for i, (meta, key, size) in enumerate(zip(metas, keys, sizes, strict=True)):
        if isinstance(meta, ChunkMeta):
            if meta.key != key:
                metas[i] = CorruptChunk("file holds another key")
            elif size < PAYLOAD_OFFSET + meta.payload_len:
                metas[i] = _truncated(meta, size)
    return metas


def _unpack_or_error(header: bytes) -> ChunkMeta | CorruptChunk:
    try:
        return unpack_header(header)
    except CorruptChunk as exc:
        return exc


def _truncated(meta: ChunkMeta, file_size: int) -> CorruptChunk:
    return CorruptChunk(f"truncated: {file_size} bytes, header promises {PAYLOAD_OFFSET + meta.payload_len}")


def _parse_new(key: bytes, header: bytes) -> ChunkMeta:
    """Parse a header not kept yet (or changed) and keep it."""
    meta = _parse_header(header)
    with _parsed_lock:
        if key not in _parsed:
            if len(_parsed) >= _PARSED_HEADERS:
                del _parsed[_parsed_order.popleft()]  # the first kept goes first
            _parsed_order.append(key)
        _parsed[key] = (header, meta)
    return meta


_PARSED_HEADERS = 4096
"""About 20 MB: the headers of 4 GiB of 1 MiB chunks. Past them, a header costs a few microseconds more (its CRC-32,
its fields, and ``created`` from its JSON: :func:`_metadata`)."""
_KEY_AT = struct.calcsize("<8sHIH")
"""Where the key lies in a header (after magic, version, header crc32 and checksum algorithm)."""
_parsed: dict[bytes, tuple[bytes, ChunkMeta]] = {}
"""By key: the last header parsed for it, and its meta (a plain dict: the quickest to look up)."""
_parsed_order: deque[bytes] = deque()
"""The keys of ``_parsed``, the first kept first (a dict's own first key, after many deletions, is a walk away)."""
_parsed_lock = ForkSafeLock()


def _parse_header(header: bytes) -> ChunkMeta:
    magic, version, crc, alg, key, namespace, offset, payload_len, tokens, meta_len, dig = _FIXED.unpack_from(header)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {magic!r}")
    if version != VERSION:
        raise CorruptChunk(f"unsupported chunk format version {version} (this build reads {VERSION})")
    view = memoryview(header)  # the crc32 of the header with its own field zeroed, in three runs (no copy)
    if zlib.crc32(view[_CRC_OFFSET + 4 :], zlib.crc32(bytes(4), zlib.crc32(view[:_CRC_OFFSET]))) != crc:
        raise CorruptChunk("header checksum mismatch")
    if offset != PAYLOAD_OFFSET or meta_len > _MAX_META or alg not in checksum.NAMES:
        raise CorruptChunk("inconsistent header fields")
    codec, codec_params, spec, created = _metadata(header[_FIXED.size : _FIXED.size + meta_len])
    return ChunkMeta(key, namespace, spec, tokens, codec, codec_params, payload_len, alg, dig, created)


_CREATED = b',"created":'
_SPEC = b',"spec":'


def _metadata(blob: bytes) -> tuple[str, dict[str, Any], KVSpec, Any]:
    """Codec, codec params, spec and ``created`` from a header's metadata JSON. The JSON around ``created`` is the
    same in every chunk of one cache: a blob that is such JSON (``_known_metadata``) around a float written as
    :func:`pack_header` writes it has only its float parsed (JSON decoding and the spec cost more than the rest of
    a header)."""
    at = blob.rfind(_CREATED) + len(_CREATED)
    end = blob.find(_SPEC, at)
    known = _known_metadata.get((blob[:at], blob[end:])) if at >= len(_CREATED) and end >= 0 else None
    if known is not None:
        text = blob[at:end]
        with contextlib.suppress(ValueError):
            created = float(text)
            if math.isfinite(created) and float.__repr__(created).encode() == text:
                return *known, created
    try:
        meta = json.loads(blob)
        spec = KVSpec.from_json(meta["spec"])
        codec, codec_params, created = meta["codec"], meta["codec_params"], meta["created"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptChunk(f"bad header metadata: {exc}") from exc
    if isinstance(codec, str) and isinstance(codec_params, dict):  # as written: remembered for the next chunks
        around = _metadata_around_created(spec, codec, _dumps(codec_params))
        with _parsed_lock:
            if around not in _known_metadata and len(_known_metadata) >= _KNOWN_METADATA:
                del _known_metadata[next(iter(_known_metadata))]  # a few dozen at most
            _known_metadata[around] = (codec, codec_params, spec)
    return codec, codec_params, spec, created


_KNOWN_METADATA = 64
_known_metadata: dict[tuple[bytes, bytes], tuple[str, dict[str, Any], KVSpec]] = {}
"""By the metadata JSON before and after the value of ``created`` (as :func:`_metadata_around_created` writes
them): what that JSON says."""


def make_meta(key: bytes, namespace: bytes, spec: KVSpec, num_tokens: int, codec: str,
              codec_params: dict[str, Any], payload: torch.Tensor | list[torch.Tensor],
              digest: bytes | None = None) -> ChunkMeta:
    """Header fields for ``payload`` (one buffer, or consecutive runs of it), checksummed on its device unless its
    ``digest`` (under :func:`checksum.algorithm_for` the payload) is given."""
    runs = payload if isinstance(payload, list) else [payload]
    alg = checksum.algorithm_for(runs[0])
    return ChunkMeta(key, namespace, spec, num_tokens, codec, codec_params, sum(r.numel() for r in runs), alg,
                     digest if digest is not None else checksum.digest_runs(runs, alg))


def verify_payload(meta: ChunkMeta, payload: torch.Tensor) -> None:
    """Raise :class:`CorruptChunk` unless ``payload`` matches the header's length and checksum."""
    if payload.numel() != meta.payload_len:
        raise CorruptChunk(f"payload is {payload.numel()} bytes, header says {meta.payload_len}")
    check_digest(meta, checksum.digest(payload, meta.checksum_alg))


def check_digest(meta: ChunkMeta, digest: bytes) -> None:
    """Raise :class:`CorruptChunk` unless ``digest`` (of a payload of the header's length) is the header's."""
    if digest != meta.payload_digest:
        raise CorruptChunk(f"payload checksum ({checksum.NAMES[meta.checksum_alg]}) mismatch")


def pack_object(meta: ChunkMeta, payload: torch.Tensor) -> bytes:
    """Header and payload as one byte string (the remote tier's object)."""
    return pack_header(meta) + payload.cpu().numpy().tobytes()


def unpack_object(data: bytes | memoryview, expected_key: bytes | None = None) -> tuple[ChunkMeta, torch.Tensor]:
    """Parse and verify a whole object; raises :class:`CorruptChunk`."""
    meta = unpack_header(bytes(data[:HEADER_SIZE]), len(data))
    if expected_key is not None and meta.key != expected_key:
        raise CorruptChunk("object holds another key")
    payload = torch.frombuffer(bytearray(data[PAYLOAD_OFFSET : PAYLOAD_OFFSET + meta.payload_len]), dtype=torch.uint8)
    verify_payload(meta, payload)
    return meta, payload
