"""The codec contract: one chunk of KV in, one self-describing byte payload out, and back."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from gdscache.spec import KVSpec


class Codec(abc.ABC):
    """Encodes one KV chunk ``[num_layers, kv_planes, num_tokens, num_kv_heads, head_dim]``.

    ``name`` and :meth:`params` go into the chunk header and the key fingerprint, so chunks
    written with other settings are never decoded with these.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters that change the bytes; part of the key fingerprint."""
        return {}

    @abc.abstractmethod
    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        """Return a new 1-D uint8 payload on ``chunk``'s device (never a view of ``chunk``)."""

    def direct_runs(self, out: torch.Tensor) -> list[torch.Tensor] | None:
        """Byte views of ``out`` that the payload fills verbatim, in order, or None.

        A codec whose payload *is* the chunk's bytes (``raw``) lets the storage tier read straight
        into the caller's tensor, skipping the staging buffer and the decode copy.
        """
        return None

    @abc.abstractmethod
    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        """Write the decoded chunk into ``out`` (shape ``spec.chunk_shape(num_tokens)``, maybe strided).

        ``payload`` is on any device; ``out`` decides where decoding runs. Raises ``ValueError``
        when the payload is malformed (the caller turns that into a cache miss).
        """
