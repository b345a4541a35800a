"""The codec contract: one chunk of KV in, one self-describing byte payload out, and back."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gdscache.pages import KVPages, as_tensor
from gdscache.spec import KVSpec


class Codec(abc.ABC):
    """Encodes one KV chunk ``[num_layers, kv_planes, num_tokens, num_kv_heads, head_dim]``.

    ``name`` and :meth:`params` go into the chunk header and the key fingerprint, so chunks
    written with other settings are never decoded with these.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]
    batches: ClassVar[bool] = False
    """True when :meth:`decode_many` of several GPU chunks beats decoding them one at a time (batched kernels)."""
    decodes_from_host: ClassVar[bool] = False
    """True when :meth:`decode` of a host payload into GPU memory costs no more than of the same payload on the GPU
    (``raw``: one copy either way); otherwise host payloads (DRAM-tier hits) are copied to the GPU first."""
    pages_in_place: ClassVar[bool] = False
    """True when :meth:`encode` and :meth:`decode` take :class:`KVPages` themselves; otherwise
    :meth:`encode_many` and :meth:`decode_many` gather and scatter around them."""

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters that change the bytes; part of the key fingerprint."""
        return {}

    @abc.abstractmethod
    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        """Return a new 1-D uint8 payload on ``chunk``'s device (never a view of ``chunk``); ``chunk`` may be
        :class:`KVPages` when ``pages_in_place``."""

    def direct_runs(self, out: torch.Tensor | KVPages) -> list[torch.Tensor] | None:
        """Byte views of ``out`` that the payload fills verbatim, in order, or None.

        A codec whose payload *is* the chunk's bytes (``raw``) lets the storage tier read straight
        into the caller's tensor, skipping the staging buffer and the decode copy.
        """
        return None

    @abc.abstractmethod
    def decode(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: torch.Tensor) -> None:
        """Write the decoded chunk into ``out`` (shape ``spec.chunk_shape(num_tokens)``, maybe strided; maybe
        :class:`KVPages` when ``pages_in_place``).

        ``payload`` is on any device; ``out`` decides where decoding runs. Raises ``ValueError``
        when the payload is malformed (the caller turns that into a cache miss).
        """

    def encode_many(self, chunks: Sequence[torch.Tensor | KVPages]) -> list[torch.Tensor]:
        """:meth:`encode` of several chunks of one shape (tensors or pages); a codec with GPU kernels batches them
        into fuller launches."""
        return [self.encode(chunk if self.pages_in_place else as_tensor(chunk)) for chunk in chunks]

    def decode_many(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int,
                    outs: Sequence[torch.Tensor | KVPages]) -> list[str | None]:
        """:meth:`decode` of several chunks into tensors or pages; per chunk None, or why it could not be decoded
        (that chunk is a miss, the others still decode)."""
        errors: list[str | None] = []
        for payload, out in zip(payloads, outs, strict=True):
            try:
                if isinstance(out, KVPages) and not self.pages_in_place:
                    self._decode_staged(payload, spec, num_tokens, out)
                else:
                    self.decode(payload, spec, num_tokens, out)
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    def decode_run(self, payloads: Sequence[torch.Tensor], spec: KVSpec, num_tokens: int, out: torch.Tensor | KVPages,
                   start: int) -> bool:
        """Decode consecutive chunks' host payloads into ``out[:, :, start : start + len(payloads) * num_tokens]`` as
        one operation where this codec can (``decodes_from_host``, into a GPU tensor); False, with nothing written,
        where it cannot (the caller decodes them one by one)."""
        return False

    def _decode_staged(self, payload: torch.Tensor, spec: KVSpec, num_tokens: int, out: KVPages) -> None:
        """:meth:`decode` into a tensor of the pages' shape, then scatter it into them."""
        staged = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        self.decode(payload, spec, num_tokens, staged)
        out.scatter(staged)
