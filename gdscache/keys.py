"""Chunk keys: a fingerprint namespace, then a prefix hash chain over token ids.

Keys depend only on bytes (never on Python's ``hash``), so every process on every host derives
the same key for the same prefix of the same model, dtype, layout, TP rank and codec.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from gdscache.spec import KVSpec

KEY_SIZE = 16
KEY_SCHEME = 2
"""What a key chain hashes, recorded in every fingerprint (a change moves keys to new namespaces): 1 hashed each token
id as 8 bytes, 2 as 4 (half the bytes per key; no vocabulary comes near 2**32 ids)."""
TOKEN_LIMIT = 1 << 32
TOKEN_DTYPE = "<u4"


def fingerprint(*, model_id: str, spec: KVSpec, layout: str, tp_rank: int, tp_size: int, chunk_size: int,
                codec: str, codec_params: dict[str, Any]) -> dict[str, Any]:
    """Everything that makes two chunks incompatible, as a JSON-able dict."""
    return {
        "key_scheme": KEY_SCHEME,
        "model_id": model_id,
        "kv": spec.to_json(),
        "layout": layout,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "chunk_size": chunk_size,
        "codec": codec,
        "codec_params": codec_params,
    }


def namespace_of(fp: dict[str, Any]) -> bytes:
    """16-byte digest of a fingerprint; the seed of every key chain under it."""
    blob = json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=KEY_SIZE, person=b"gdscache-ns").digest()


def as_token_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Tokens as a 1-D little-endian uint32 array (as keys hash them); TypeError/ValueError name what is wrong."""
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got a tensor of dtype {tokens.dtype}")
        arr = tokens.detach().cpu().numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    elif isinstance(tokens, (list, tuple, range)):
        arr = _sequence_array(tokens)
    else:
        raise TypeError(f"tokens must be a list, numpy array or torch tensor of ints, got {type(tokens).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"token ids must be >= 0, found {int(arr.min())}")
    if arr.size and arr.itemsize > 4 and arr.max() >= TOKEN_LIMIT:
        raise ValueError(f"token ids must be below 2**32, found {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=TOKEN_DTYPE)


def _sequence_array(tokens: Sequence[int]) -> np.ndarray:
    """A list, tuple or range of ints as an int64 array, for :func:`as_token_array` to check (a vLLM request's token
    list comes this way on every call: the element types are checked once each, not per element, and numpy converts in
    C)."""
    if not all(map(_is_int_type, set(map(type, tokens)))):
        bad = next(t for t in tokens if not _is_int_type(type(t)))
        raise TypeError(f"tokens must be ints, found {bad!r} ({type(bad).__name__})")
    try:
        return np.asarray(tokens, dtype=np.int64)
    except OverflowError:
        raise ValueError("token ids must be >= 0 and below 2**32; found one outside") from None


def _is_int_type(kind: type) -> bool:
    return issubclass(kind, (int, np.integer)) and not issubclass(kind, bool)


def chunk_keys(namespace: bytes, tokens: np.ndarray, chunk_size: int) -> list[bytes]:
    """Keys of the whole chunks of ``tokens`` (:func:`as_token_array`'s): key[i] = blake2b(key[i-1] || tokens of chunk
    i, 4 bytes each)."""
    return ChunkKeys(namespace, tokens, chunk_size)[:]


class ChunkKeys(Sequence[bytes]):
    """:func:`chunk_keys`, each key hashed once it is asked for (with those before it): a retrieve starts reading its
    first chunks before it has hashed the rest (a key costs a few microseconds), and hashes none past a miss."""

    def __init__(self, namespace: bytes, tokens: np.ndarray, chunk_size: int) -> None:
        if tokens.dtype != np.dtype(TOKEN_DTYPE):  # other widths would hash other bytes: keys no other process derives
            raise TypeError(f"chunk keys hash tokens as {TOKEN_DTYPE} (as_token_array's), got {tokens.dtype}")
        self._data = memoryview(tokens.tobytes())  # one copy, sliced per chunk
        self._step = chunk_size * tokens.itemsize
        self._count = len(tokens) // chunk_size
        self._keys: list[bytes] = []
        self._prev = namespace
        self._empty = hashlib.blake2b(digest_size=KEY_SIZE, person=b"gdscache-kv")  # copied per chunk, not rebuilt

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):  # positions made absolute first: the keys hashed so far are not all of them
            wanted = range(*index.indices(self._count))
            if wanted:
                self._hash_to(max(wanted[0], wanted[-1]) + 1)
            return self._keys[wanted.start : wanted.stop] if wanted.step == 1 else [self._keys[i] for i in wanted]
        at = range(self._count)[index]  # an index out of range raises IndexError here
        self._hash_to(at + 1)
        return self._keys[at]

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self._count):
            if i == len(self._keys):
                self._hash_to(min(self._count, 2 * i + 8))  # ahead in runs, not a call per key
            yield self._keys[i]

    def _hash_to(self, count: int) -> None:
        """Hash the keys before ``count`` not hashed yet."""
        keys, data, step, prev, empty = self._keys, self._data, self._step, self._prev, self._empty
        for start in range(len(keys) * step, count * step, step):
            h = empty.copy()
            h.update(prev)
            h.update(data[start : start + step])
            prev = h.digest()
            keys.append(prev)
        self._prev = prev
