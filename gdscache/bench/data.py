"""Synthetic KV for the benchmark, and the buffers it lives in.

Random normal bytes would make every compressor look useless, and constants would make it look
magic. Real KV has smooth token-to-token structure and a few loud channels, so the synthetic KV
here has both: a random walk sampled every 16 tokens and linearly interpolated, plus white noise
at 1/4 of its scale, times a log-normal scale per channel of each (layer, K/V) plane.
Compression ratios on real KV differ; this data is for throughput, not for codec quality.
"""

from __future__ import annotations

import torch

from gdscache.spec import KVSpec
from io_backends.buffers import aligned_empty

_STRIDE = 16


def kv_buffer(spec: KVSpec, tokens: int, device: torch.device) -> torch.Tensor:
    """An uninitialised KV tensor ``[layers, 2, tokens, heads, dim]``; page-aligned on the host (for O_DIRECT)."""
    shape = spec.chunk_shape(tokens)
    nbytes = spec.bytes_per_token() * tokens
    if device.type == "cuda":
        return torch.empty(shape, dtype=spec.dtype, device=device)
    return aligned_empty(nbytes).view(spec.dtype).view(shape)


def synthetic_kv(spec: KVSpec, tokens: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """KV with token-wise locality and channel outliers (see the module docstring); deterministic per seed.

    One smooth-plus-noise pool of ``2 * tokens`` rows is generated; each (layer, K/V) plane is a
    window of it at its own random offset, times its own channel scales, so every chunk differs.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    channels = spec.num_kv_heads * spec.head_dim
    length = 2 * tokens
    anchors = length // _STRIDE + 2
    walk = torch.randn(anchors, channels, generator=gen, device=device).cumsum(0) / anchors**0.5
    pos = torch.arange(length, device=device, dtype=torch.float32) / _STRIDE
    lo = pos.long()
    frac = (pos - lo).unsqueeze(1)
    pool = walk[lo] * (1 - frac) + walk[lo + 1] * frac
    pool += torch.randn(length, channels, generator=gen, device=device) * 0.25
    offsets = torch.randint(0, tokens + 1, (spec.num_layers, spec.kv_planes), generator=gen, device=device).tolist()
    scales = torch.randn(spec.num_layers, spec.kv_planes, channels, generator=gen, device=device).mul_(0.5).exp_()
    kv = kv_buffer(spec, tokens, device)
    for layer in range(spec.num_layers):
        for plane in range(spec.kv_planes):
            start = offsets[layer][plane]
            kv[layer, plane].view(tokens, channels).copy_(pool[start : start + tokens] * scales[layer, plane])
    return kv
