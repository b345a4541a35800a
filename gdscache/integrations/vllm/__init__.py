"""vLLM V1 KV connector for gdscache.

Enable it with ``--kv-transfer-config`` naming ``GDSCacheConnector`` and this module (docs/VLLM.md).
The connector class is imported on first access so that the layout and settings helpers work
without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GDSCacheConnector"]


def __getattr__(name: str) -> Any:
    if name == "GDSCacheConnector":
        from gdscache.integrations.vllm.connector import GDSCacheConnector

        return GDSCacheConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
