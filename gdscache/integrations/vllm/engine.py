"""What the connector reads from a vLLM engine: its KV spec, its fingerprint and its gdscache Config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gdscache.config import Config, KVShape
from gdscache.integrations.vllm.layout import Packing, PageFormat, layout_name
from gdscache.integrations.vllm.settings import connector_config, model_fingerprint
from gdscache.spec import dtype_name

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class EngineKV:
    """The single attention KV cache group gdscache serves."""

    layer_names: list[str]
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: Any  # torch.dtype
    packing: Packing
    layout: str

    @property
    def page_format(self) -> PageFormat:
        return PageFormat(self.packing, self.num_kv_heads, self.head_size, self.block_size)

    @property
    def kv_shape(self) -> KVShape:
        return KVShape(
            num_layers=len(self.layer_names), num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
            kv_planes=2, dtype=dtype_name(self.dtype),
        )


def engine_kv(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> EngineKV:
    """Read and check the KV cache spec; clear errors for models gdscache cannot serve."""
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"GDSCacheConnector supports models with one KV cache group (uniform full attention); this model has "
            f"{len(groups)} ({', '.join(type(g.kv_cache_spec).__name__ for g in groups)})"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, AttentionSpec) or getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise ValueError(f"GDSCacheConnector needs a K/V attention cache with equal K and V head sizes; got {spec!r}")
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        packing: Packing = "cpu_blocked"
        isa = _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, vllm_config.cache_config.cache_dtype)
        layout = layout_name(packing, isa=isa, block_size=spec.block_size)
    else:
        packing = "kv_packed"
        layout = layout_name(packing)
    return EngineKV(
        layer_names=list(groups[0].layer_names), num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
        block_size=spec.block_size, dtype=spec.dtype, packing=packing, layout=layout,
    )


def rank_config(vllm_config: VllmConfig, kv: EngineKV, tp_rank: int) -> Config:
    """The gdscache Config of TP rank ``tp_rank``; its chunk size must be a whole number of blocks."""
    model = vllm_config.model_config
    transfer = vllm_config.kv_transfer_config
    config = connector_config(
        dict(transfer.kv_connector_extra_config or {}),
        model_id=model_fingerprint(str(model.model), model.revision, dtype_name(kv.dtype)),
        kv_shape=kv.kv_shape,
        layout=kv.layout,
        tp_rank=tp_rank,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
    )
    if config.chunk_size % kv.block_size:
        raise ValueError(
            f"gdscache chunk_size {config.chunk_size} must be a multiple of vLLM's block_size {kv.block_size}"
        )
    return config
