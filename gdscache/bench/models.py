"""Model shapes for the benchmark: the KV geometry plus what a prefill costs.

Presets follow the published configs of Llama-3.1-8B, Llama-3.1-70B and Qwen2.5-7B.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gdscache.spec import KVSpec


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer: enough to size its KV cache and its prefill."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    hidden_size: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "num_q_heads", "hidden_size", "intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model {self.name!r}: {field} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: query heads ({self.num_q_heads}) must be a multiple of KV heads ({self.num_kv_heads})"
            )

    def kv_spec(self, dtype: torch.dtype) -> KVSpec:
        return KVSpec(self.num_layers, 2, self.num_kv_heads, self.head_dim, dtype)

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of a causal prefill of ``tokens`` tokens (matmuls only; 2 FLOPs per multiply-add).

        Per layer: Q, K, V, O projections ``2*T*h*(2*q + 2*kv)``, the SwiGLU MLP ``6*T*h*I``, and
        causal attention ``2*T*T*q`` (QK^T plus AV, halved by the causal mask), where ``q`` and
        ``kv`` are the query and KV widths (heads x head_dim). Embedding, norms, RoPE and the LM
        head are left out: a slight underestimate of prefill, so the TTFT saved is conservative.
        """
        t = float(tokens)
        q = self.num_q_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        h = self.hidden_size
        per_layer = 2 * t * h * (2 * q + 2 * kv) + 6 * t * h * self.intermediate_size + 2 * t * t * q
        return per_layer * self.num_layers


PRESETS: dict[str, ModelShape] = {
    "llama-8b": ModelShape("llama-8b", 32, 8, 128, 32, 4096, 14336),
    "llama-70b": ModelShape("llama-70b", 80, 8, 128, 64, 8192, 28672),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 4, 128, 28, 3584, 18944),
}
ALIASES = {"qwen-class": "qwen2.5-7b", "qwen": "qwen2.5-7b"}


def resolve_model(
    name: str,
    *,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    q_heads: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> ModelShape:
    """A preset, optionally with some dimensions overridden (the result is named ``custom``).

    When KV heads or head_dim change and the query heads / hidden size are not given, they follow
    the preset's proportions: query heads = KV heads x the preset's group size, hidden = query
    heads x head_dim, and the MLP keeps the preset's hidden-to-intermediate ratio.
    """
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join([*PRESETS, *ALIASES])}")
    base = PRESETS[key]
    overrides = {
        "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "q_heads": q_heads,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
    }
    for flag, value in overrides.items():
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if all(v is None for v in overrides.values()):
        return base
    kvh = kv_heads or base.num_kv_heads
    dim = head_dim or base.head_dim
    qh = q_heads or kvh * (base.num_q_heads // base.num_kv_heads)
    hidden = hidden_size or (qh * dim if (kv_heads or head_dim or q_heads) else base.hidden_size)
    inter = intermediate_size or max(1, round(hidden * base.intermediate_size / base.hidden_size))
    return replace(
        base, name=f"custom({base.name})", num_layers=layers or base.num_layers, num_kv_heads=kvh,
        head_dim=dim, num_q_heads=qh, hidden_size=hidden, intermediate_size=inter,
    )
