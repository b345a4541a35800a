"""What a KV tensor looks like: the shape and dtype every chunk of one cache shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
        "float8_e5m2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dt is not None
}


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a supported floating dtype; raises TypeError for others."""
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"unsupported KV dtype {dtype}; supported: {', '.join(FLOAT_DTYPES)}")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; supported: {', '.join(FLOAT_DTYPES)}") from None


@dataclass(frozen=True)
class KVSpec:
    """Shape of a KV tensor ``[num_layers, kv_planes, num_tokens, num_kv_heads, head_dim]`` minus tokens.

    ``kv_planes`` is 2 (K and V) or 1 (an MLA latent).
    """

    num_layers: int
    kv_planes: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVSpec.{field} must be a positive int, got {value!r}")
        if self.kv_planes not in (1, 2):
            raise ValueError(f"KVSpec.kv_planes must be 2 (K and V) or 1 (MLA latent), got {self.kv_planes!r}")
        dtype_name(self.dtype)

    @classmethod
    def of(cls, kv: torch.Tensor, name: str = "kv") -> KVSpec:
        """The spec of a KV tensor (or :class:`gdscache.pages.KVPages`), with clear errors for wrong rank or dtype that
        call it ``name`` (the caller's argument: ``kv`` or ``out``)."""
        from gdscache.pages import KVPages

        if isinstance(kv, KVPages):
            return kv.spec
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or gdscache.KVPages, got {type(kv).__name__}")
        if kv.dim() != 5:
            raise ValueError(
                f"{name} must have 5 dims [num_layers, 2, num_tokens, num_kv_heads, head_dim], got shape {tuple(kv.shape)}"
            )
        if not kv.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {kv.dtype}")
        num_layers, planes, _, heads, dim = kv.shape
        return _interned(cls(int(num_layers), int(planes), int(heads), int(dim), kv.dtype))

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_planes, num_tokens, self.num_kv_heads, self.head_dim)

    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_planes * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "kv_planes": self.kv_planes,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_json(cls, d: dict) -> KVSpec:
        return _interned(cls(int(d["num_layers"]), int(d["kv_planes"]), int(d["num_kv_heads"]), int(d["head_dim"]),
                             parse_dtype(d["dtype"])))


_SPECS: dict[KVSpec, KVSpec] = {}


def _interned(spec: KVSpec) -> KVSpec:
    """One object per distinct spec, for :meth:`KVSpec.of` and :meth:`KVSpec.from_json`: a chunk header's spec and a
    request's then compare by identity (``is``) before a field-by-field ``==`` (a retrieve compares one per chunk)."""
    return _SPECS.setdefault(spec, spec)
