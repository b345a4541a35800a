"""What the request-level GPU benchmarks (gpu_warm_files.py, gpu_store_files.py) share: their command line, the
request of KV they move and their clock."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

TOKENS, CHUNK = 4096, 256
"""A request is 4096 tokens in chunks of 256 (16 chunk files) unless a benchmark's ``--tokens`` says otherwise."""


def parse_args(doc: str | None, default_dir: str, default_shape: str, default_requests: int,
               more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The shared options, and those ``more`` adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=default_dir)
    parser.add_argument("--shape", default=default_shape, help="layers,kv_heads,head_dim (bf16)")
    parser.add_argument("--requests", type=int, default=default_requests)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--json", default=None)
    if more is not None:
        more(parser)
    return parser.parse_args()


def request_kv(shape: str, tokens: int = TOKENS) -> torch.Tensor:
    """One request's KV on the GPU: ``[layers, 2, tokens, kv_heads, head_dim]`` bf16 for ``shape`` "layers,heads,dim"."""
    layers, heads, dim = (int(x) for x in shape.split(","))
    return torch.randn(layers, 2, tokens, heads, dim, dtype=torch.bfloat16, device="cuda")


def timed(fn: Callable[[], None]) -> float:
    """Seconds ``fn`` takes, the GPU's queued work included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def write_json(path: str | None, args: argparse.Namespace, io_mode: str, **results: object) -> None:
    """Save ``results`` with the command line, the card, the io_mode and the date (nothing where ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "card": torch.cuda.get_device_name(), "io_mode": io_mode,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results}, f, indent=1)
