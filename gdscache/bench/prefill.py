"""Prefill time for a model shape: measured with a model-shaped forward pass, or estimated from FLOPs."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gdscache.bench.models import ModelShape

DEFAULT_TFLOPS = 400.0
"""Assumed sustained prefill rate for the estimate: an H100 SXM's 989 dense bf16 TFLOP/s at ~40% MFU."""


@dataclass(frozen=True)
class Prefill:
    seconds: float
    method: str  # "measured" or "estimated"
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"seconds": self.seconds, "method": self.method, "detail": self.detail}


class _Layer(nn.Module):
    """One Llama-style decoder layer (RMSNorm, GQA attention, SwiGLU MLP), without RoPE."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        q, kv, h = shape.num_q_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.hidden_size
        self.shape = shape
        self.norm1 = nn.RMSNorm(h)
        self.qkv = nn.Linear(h, q + 2 * kv, bias=False)
        self.o = nn.Linear(q, h, bias=False)
        self.norm2 = nn.RMSNorm(h)
        self.gate_up = nn.Linear(h, 2 * shape.intermediate_size, bias=False)
        self.down = nn.Linear(shape.intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shape
        t = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).split(
            [s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1
        )
        q = q.view(1, t, s.num_q_heads, s.head_dim).transpose(1, 2)
        k = k.view(1, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(1, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(attn.transpose(1, 2).reshape(1, t, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def measure_prefill(shape: ModelShape, tokens: int, device: torch.device, dtype: torch.dtype,
                    layers: int = 2, repeats: int = 3) -> Prefill:
    """Median time of ``layers`` random-weight decoder layers over ``tokens`` tokens, scaled to the full depth."""
    layers = min(layers, shape.num_layers)
    torch.manual_seed(0)
    with torch.device(device):
        stack = nn.Sequential(*[_Layer(shape) for _ in range(layers)]).to(dtype).eval()
        x = torch.randn(1, tokens, shape.hidden_size, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            stack(x)
            _sync(device)
            if i:  # the first pass warms up kernels and allocators
                times.append(time.perf_counter() - start)
    per_layer = statistics.median(times) / layers
    return Prefill(
        per_layer * shape.num_layers, "measured",
        f"{layers} random-weight {shape.name} layers over {tokens} tokens on {device} ({dtype}), "
        f"median of {repeats}, scaled x{shape.num_layers / layers:g} to {shape.num_layers} layers; no RoPE/embedding/LM head",
    )


def estimate_prefill(shape: ModelShape, tokens: int, tflops: float = DEFAULT_TFLOPS) -> Prefill:
    """FLOPs of the prefill (``ModelShape.prefill_flops``) at an assumed sustained rate."""
    if tflops <= 0:
        raise ValueError(f"--prefill-tflops must be > 0, got {tflops}")
    flops = shape.prefill_flops(tokens)
    return Prefill(
        flops / (tflops * 1e12), "estimated",
        f"{flops / 1e12:.1f} TFLOP for {tokens} tokens at an assumed {tflops:g} TFLOP/s "
        f"(default: H100 SXM dense bf16 989 TFLOP/s at ~40% MFU)",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
