"""``GDSCacheConnector``: gdscache as a vLLM V1 KV connector (``kv_both``, ``kv_producer``, ``kv_consumer``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from gdscache.integrations.vllm.engine import engine_kv, rank_config
from gdscache.integrations.vllm.layout import PagedKV, packing_of_backend
from gdscache.integrations.vllm.metadata import GDSCacheMetadata
from gdscache.integrations.vllm.scheduler import SchedulerSide
from gdscache.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.gdscache")


class GDSCacheConnector(KVConnectorBase_V1):
    """Loads prompt prefixes stored by gdscache and stores new whole chunks.

    ``kv_connector_extra_config`` keys are gdscache Config fields (``path``, ``chunk_size``,
    ``codec``, ``cpu_cache_bytes``, ``max_disk_bytes``, ``remote_url``, ...); ``GDSCACHE_CONFIG``
    may name a YAML file of the same fields. A chunk that fails to load is reported through
    ``get_block_ids_with_load_errors`` and recomputed, so the connector sets vLLM's
    ``kv_load_failure_policy`` to ``recompute``.
    """

    _cache_hit_source = CacheHitSource.DISK

    @property
    def requires_kv_delivery(self) -> bool:
        """A dropped save is a future miss, not a lost hand-off."""
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._load = transfer.is_kv_consumer
        self._save = transfer.is_kv_producer
        self._kv = engine_kv(vllm_config, kv_cache_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                log.info("gdscache: a chunk that fails to load is a cache miss; setting kv_load_failure_policy=recompute")
                transfer.kv_load_failure_policy = "recompute"
            tp_size = vllm_config.parallel_config.tensor_parallel_size
            configs = [rank_config(vllm_config, self._kv, rank) for rank in range(tp_size)]
            self._scheduler = SchedulerSide(configs, self._kv.block_size, load=self._load, save=self._save)
            log.info("gdscache connector (scheduler): role=%s layout=%s namespace model=%s",
                     transfer.kv_role, self._kv.layout, configs[0].model_id)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._config = rank_config(vllm_config, self._kv, get_tensor_model_parallel_rank())

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        layers = get_layers_from_vllm_config(self._vllm_config, Attention, self._kv.layer_names)
        for name, layer in layers.items():
            backend = layer.get_attn_backend().get_name()
            if packing_of_backend(backend) != self._kv.packing:
                raise ValueError(
                    f"layer {name} uses attention backend {backend}, whose KV layout is not the "
                    f"{self._kv.packing!r} layout expected on this platform"
                )
        missing = [name for name in self._kv.layer_names if name not in kv_caches]
        if missing:
            raise ValueError(f"vLLM registered no KV cache for layers {missing}")
        pager = PagedKV([kv_caches[n] for n in self._kv.layer_names], self._kv.page_format,
                        self._kv_cache_config.num_blocks)
        if self._kv.packing == "cpu_blocked" and pager.split != 1:
            raise ValueError("gdscache needs the CPU attention kernel block size to equal vLLM's block_size")
        self._worker = WorkerSide(self._config, pager)
        log.info("gdscache connector (worker %d/%d): layout=%s io_mode=%s one-kernel-gather=%s",
                 self._config.tp_rank, self._config.tp_size, self._kv.layout, self._worker.cache.io_mode,
                 pager.stacked is not None)

    def _worker_meta(self) -> tuple[WorkerSide, GDSCacheMetadata] | None:
        if self._worker is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        assert isinstance(meta, GDSCacheMetadata)
        return self._worker, meta

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, GDSCacheMetadata):
            self._worker.wait_for(kv_connector_metadata.preempted)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if (bound := self._worker_meta()) is not None:
            bound[0].load(bound[1])

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in ``start_load_kv``: each chunk covers every layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        """Saves gather all layers at once in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        if (bound := self._worker_meta()) is not None:
            bound[0].save(bound[1])

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.finished(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> GDSCacheMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request), None
