"""The scheduler half: finds hits beyond vLLM's prefix cache and plans loads and saves."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gdscache.api import GDSCache
from gdscache.config import Config
from gdscache.integrations.vllm.metadata import GDSCacheMetadata, LoadSpec, SaveSpec

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.gdscache")


@dataclass
class _Request:
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    hit: int = 0  # tokens this cache holds for the prompt, as last looked up
    save_issued: bool = False


class SchedulerSide:
    """Lookups (the minimum over TP ranks) and the per-step load/save plan."""

    def __init__(self, rank_configs: list[Config], block_size: int, *, load: bool, save: bool) -> None:
        self.caches = [GDSCache(cfg) for cfg in rank_configs] if load else []
        self.chunk_size = rank_configs[0].chunk_size
        self.block_size = block_size
        self.load = load
        self.save = save
        self._hits: dict[str, int] = {}
        self._loads: dict[str, tuple[int, int]] = {}
        self._requests: dict[str, _Request] = {}

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens past ``num_computed_tokens`` that the cache can supply (never the last prompt token)."""
        if not self.load:
            return 0
        prompt = list(request.prompt_token_ids or [])
        # The engine must compute at least one prompt token to produce logits.
        hit = min(cache.lookup(prompt[: len(prompt) - 1]) for cache in self.caches) if len(prompt) > 1 else 0
        hit -= hit % self.block_size
        self._hits[request.request_id] = hit
        return max(0, hit - num_computed_tokens)

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        """Remember the hit: ``request.num_computed_tokens`` does not include it yet."""
        hit = self._hits.pop(request.request_id, 0)
        if num_external_tokens > 0 and hit >= num_external_tokens:
            self._loads[request.request_id] = (hit - num_external_tokens, hit)

    def build_meta(self, out: SchedulerOutput) -> GDSCacheMetadata:
        meta = GDSCacheMetadata(preempted=set(out.preempted_req_ids or ()))
        for new in out.scheduled_new_reqs:
            state = _Request(list(new.prompt_token_ids or []), list(new.block_ids[0]))
            self._requests[new.req_id] = state
            self._plan(meta, new.req_id, state, new.num_computed_tokens + out.num_scheduled_tokens[new.req_id])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, state, cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id])
        self._loads.clear()
        return meta

    def _plan(self, meta: GDSCacheMetadata, req_id: str, state: _Request, computed_after: int) -> None:
        load = self._loads.get(req_id)
        if load is not None:
            start, end = load
            state.hit = max(state.hit, end)
            nblocks = -(-end // self.block_size)
            meta.loads.append(LoadSpec(req_id, state.token_ids[:end], state.block_ids[:nblocks], start, end))
        n_save = len(state.token_ids) // self.chunk_size * self.chunk_size
        if self.save and not state.save_issued and computed_after >= len(state.token_ids) and n_save > state.hit:
            state.save_issued = True
            meta.saves.append(SaveSpec(req_id, state.token_ids[:n_save], state.block_ids[: n_save // self.block_size]))

    def finished(self, request: Request) -> bool:
        """True when a save was issued: the worker reports it through ``get_finished`` before blocks are freed."""
        self._hits.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        state = self._requests.pop(request.request_id, None)
        return state is not None and state.save_issued

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
