"""The gdscache Config of a vLLM connector: user keys plus the engine's fingerprint.

User keys come from ``kv_connector_extra_config`` and, when ``GDSCACHE_CONFIG`` names a YAML file,
from that file (extra-config keys win; ``GDSCACHE_<FIELD>`` variables win over both). The
connector sets the fingerprint fields itself: the KV shape, the layout and the TP rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gdscache.config import Config, KVShape

CONFIG_ENV = "GDSCACHE_CONFIG"
ENGINE_FIELDS = frozenset({"kv_shape", "layout", "tp_rank", "tp_size"})


def user_fields(extra: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Config fields the user chose: YAML file (if ``GDSCACHE_CONFIG`` is set) overlaid with ``extra``."""
    environ = os.environ if environ is None else environ
    fields: dict[str, Any] = {}
    yaml_path = environ.get(CONFIG_ENV)
    if yaml_path:
        if not os.path.isfile(yaml_path):
            raise ValueError(f"{CONFIG_ENV}={yaml_path!r} does not name a readable YAML file")
        fields.update(Config.from_yaml(yaml_path, env=False).model_dump(exclude_unset=True))
    fields.update(extra)
    engine_set = sorted(ENGINE_FIELDS & fields.keys())
    if engine_set:
        raise ValueError(
            f"gdscache keys {engine_set} are set by the vLLM connector from the engine; remove them from "
            "kv_connector_extra_config / the YAML file"
        )
    return fields


def connector_config(
    extra: Mapping[str, Any],
    *,
    model_id: str,
    kv_shape: KVShape,
    layout: str,
    tp_rank: int,
    tp_size: int,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validated Config for one rank; ``model_id`` is used unless the user set one explicitly."""
    fields = user_fields(extra, environ)
    fields.setdefault("model_id", model_id)
    fields.update(kv_shape=kv_shape, layout=layout, tp_rank=tp_rank, tp_size=tp_size)
    if "path" not in fields:
        raise ValueError(
            "gdscache needs a storage path: set \"path\" in kv_connector_extra_config or in the YAML file "
            f"named by {CONFIG_ENV}"
        )
    return Config.build(fields)


def model_fingerprint(model: str, revision: str | None, dtype: str) -> str:
    """``model@revision/dtype``: the engine part of the key namespace."""
    return f"{model}@{revision or 'default'}/{dtype}"
