"""Extra-config and YAML mapping onto gdscache's Config (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gdscache.config import KVShape
from gdscache.integrations.vllm.settings import CONFIG_ENV, connector_config, model_fingerprint

SHAPE = KVShape(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32")
ENGINE = {"model_id": "m@default/float32", "kv_shape": SHAPE, "layout": "LPTHD", "tp_rank": 1, "tp_size": 2}


def test_extra_config_keys_become_config_fields(tmp_path: Path) -> None:
    cfg = connector_config({"path": str(tmp_path), "storage": "posix", "chunk_size": 64, "cpu_cache_bytes": "1MiB"},
                           environ={}, **ENGINE)
    assert (cfg.path, cfg.storage, cfg.chunk_size, cfg.cpu_cache_bytes) == (str(tmp_path), "posix", 64, 2**20)
    assert (cfg.tp_rank, cfg.tp_size, cfg.layout, cfg.kv_shape) == (1, 2, "LPTHD", SHAPE)
    assert cfg.model_id == "m@default/float32"


def test_yaml_file_is_overlaid_by_extra_config(tmp_path: Path) -> None:
    yaml_file = tmp_path / "gdscache.yaml"
    yaml_file.write_text(f"path: {tmp_path}/yaml\nchunk_size: 128\ncodec: raw\nmodel_id: shared-name\n")
    cfg = connector_config({"chunk_size": 32}, environ={CONFIG_ENV: str(yaml_file)}, **ENGINE)
    assert cfg.path == f"{tmp_path}/yaml"
    assert cfg.chunk_size == 32
    assert cfg.model_id == "shared-name"  # an explicit model_id wins over the engine's name


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage path"):
        connector_config({}, environ={}, **ENGINE)
    with pytest.raises(ValueError, match="unknown config key 'chunksize'"):
        connector_config({"path": str(tmp_path), "chunksize": 4}, environ={}, **ENGINE)
    with pytest.raises(ValueError, match="set by the vLLM connector"):
        connector_config({"path": str(tmp_path), "tp_rank": 0}, environ={}, **ENGINE)
    with pytest.raises(ValueError, match="does not name a readable YAML file"):
        connector_config({}, environ={CONFIG_ENV: str(tmp_path / "missing.yaml")}, **ENGINE)


def test_model_fingerprint_has_name_revision_and_dtype() -> None:
    assert model_fingerprint("org/model", "abc123", "bfloat16") == "org/model@abc123/bfloat16"
    assert model_fingerprint("org/model", None, "float16") == "org/model@default/float16"
