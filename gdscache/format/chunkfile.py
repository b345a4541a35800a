"""The chunk file: a 4 KiB header, then the payload on a 4 KiB boundary. See docs/FORMAT.md.

The same bytes are a file in the local tier and an object in the remote tier.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

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
    if known is not None and known[0] == header:  # a compare of the bytes, cheaper than hashing them
        meta = known[1]
    else:
        meta = _parse_header(header)
        with _parsed_lock:
            if key not in _parsed and len(_parsed) >= _PARSED_HEADERS:
                del _parsed[next(iter(_parsed))]  # the first kept goes first
            _parsed[key] = (header, meta)
    if file_size is not None and file_size < PAYLOAD_OFFSET + meta.payload_len:
        raise CorruptChunk(f"truncated: {file_size} bytes, header promises {PAYLOAD_OFFSET + meta.payload_len}")
    return meta


_PARSED_HEADERS = 1024
_KEY_AT = struct.calcsize("<8sHIH")
"""Where the key lies in a header (after magic, version, header crc32 and checksum algorithm)."""
_parsed: dict[bytes, tuple[bytes, ChunkMeta]] = {}
"""By key: the last header parsed for it, and its meta."""
_parsed_lock = ForkSafeLock()


def _parse_header(header: bytes) -> ChunkMeta:
    magic, version, crc, alg, key, namespace, offset, payload_len, tokens, meta_len, dig = _FIXED.unpack_from(header)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {magic!r}")
    if version != VERSION:
        raise CorruptChunk(f"unsupported chunk format version {version} (this build reads {VERSION})")
    zeroed = bytearray(header)
    struct.pack_into("<I", zeroed, _CRC_OFFSET, 0)
    if zlib.crc32(zeroed) != crc:
        raise CorruptChunk("header checksum mismatch")
    if offset != PAYLOAD_OFFSET or meta_len > _MAX_META or alg not in checksum.NAMES:
        raise CorruptChunk("inconsistent header fields")
    try:
        meta = json.loads(header[_FIXED.size : _FIXED.size + meta_len])
        spec = KVSpec.from_json(meta["spec"])
        return ChunkMeta(key, namespace, spec, tokens, meta["codec"], meta["codec_params"], payload_len, alg, dig, meta["created"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptChunk(f"bad header metadata: {exc}") from exc


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
