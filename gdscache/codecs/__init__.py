"""Codecs by name: ``get_codec("raw")``. Each codec lives in its own module."""

from __future__ import annotations

from typing import Any

from gdscache.codecs.base import Codec
from gdscache.codecs.cachegen import CacheGenCodec
from gdscache.codecs.lossless import LosslessCodec
from gdscache.codecs.raw import RawCodec

_REGISTRY: dict[str, type[Codec]] = {c.name: c for c in (RawCodec, LosslessCodec, CacheGenCodec)}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Make ``cls`` available to :func:`get_codec` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """Instantiate the codec called ``name``; unknown names raise a ValueError listing the known ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(codec_names())}") from None
    return cls(**params)


__all__ = ["CacheGenCodec", "Codec", "LosslessCodec", "RawCodec", "codec_names", "get_codec", "register_codec"]
