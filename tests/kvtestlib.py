"""Helpers shared by the tests: KV tensors with real values (never zeros) and child-interpreter environments."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def make_kv(layers: int = 2, tokens: int = 64, heads: int = 2, dim: int = 8, *, planes: int = 2,
            dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, planes, tokens, heads, dim, generator=g).to(dtype).to(device)


def run_threads(target: Callable[[int], None], count: int) -> None:
    """Run ``target(k)`` for ``k`` in ``range(count)`` on as many threads at once, and wait for all of them."""
    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a child interpreter that imports gdscache from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDSCACHE_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env

