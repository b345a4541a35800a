"""What the scheduler half of the connector tells the worker half each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of a request; ``block_ids`` cover tokens ``[0, end)``."""

    req_id: str
    token_ids: list[int]  # the first ``end`` prompt tokens
    block_ids: list[int]
    start: int
    end: int


@dataclass
class SaveSpec:
    """Store the whole chunks of ``token_ids``, whose KV sits in ``block_ids`` (in token order)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class GDSCacheMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
