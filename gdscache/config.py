"""Configuration: one validated model, from keyword arguments, a YAML file, or GDSCACHE_* variables.

Precedence, highest first: ``GDSCACHE_<FIELD>`` environment variables, then explicit values
(keyword arguments or YAML), then defaults. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "GDSCACHE_"
NOT_FIELDS = {"GDSCACHE_CONFIG", "GDSCACHE_CUDA_LIB", "GDSCACHE_NO_KERNELS", "GDSCACHE_SKIP_CUDA", "GDSCACHE_CUDA_ARCHS",
              "GDSCACHE_IO_LIB", "GDSCACHE_NO_NATIVE_IO"}
"""GDSCACHE_* variables that are not config fields: a YAML path (vLLM connector), and where the kernel and
batched-read libraries are built and loaded from (or that they are not to be loaded)."""
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40, "p": 10**15,
          "pb": 10**15, "pib": 2**50}


def parse_size(value: int | str | None, name: str = "size") -> int | None:
    """``"10GiB"`` -> 10737418240; ints pass through; ``None`` stays ``None``."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{name}: cannot parse size {value!r}; use bytes or e.g. '512MiB', '10GB'")
    return int(float(match.group(1)) * _UNITS[unit])


class KVShape(BaseModel):
    """The KV spec, for processes that call ``lookup`` before any tensor has been seen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    kv_planes: Literal[1, 2] = 2
    dtype: str = "bfloat16"


class Config(BaseModel):
    """Every gdscache setting. See docs/CONFIG.md for the meaning of each field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str = Field(description="directory of the local tier (NVMe, WEKA, any POSIX filesystem)")
    chunk_size: int = Field(256, gt=0, le=1 << 20, description="tokens per chunk")
    model_id: str = Field("default", min_length=1, description="model name and revision; part of every key")
    storage: Literal["gds", "posix"] = Field("gds", description="gds: kvikio/cuFile when CUDA exists; posix: forced")
    codec: str = Field("raw", description="raw, lossless or cachegen")
    codec_params: dict[str, Any] = Field(default_factory=dict, description="codec settings, e.g. {'bits': 4}")
    codec_profile: str | None = Field(None, description="per-model calibration file for the cachegen codec")
    max_disk_bytes: int | None = Field(None, description="local tier quota; None = unlimited")
    cpu_cache_bytes: int = Field(0, description="DRAM tier quota; 0 disables it")
    write_mode: Literal["sync", "async"] = Field(
        "sync", description="sync: store() returns once its chunks are published; async: before (write-behind; "
                            "GPU KV through kvikio is encoded into buffers of its own and its files are already "
                            "being written), flush() waits")
    write_queue_depth: int = Field(32, gt=0, description="chunks queued or being written in async mode "
                                                        "before store() blocks")
    io_threads: int = Field(12, gt=0, le=256, description="parallel file operations")
    o_direct: Literal["auto", "on", "off"] = Field("auto", description="POSIX O_DIRECT use")
    durable: bool = Field(True, description="fsync each chunk before publishing it")
    remote_url: str | None = Field(None, description="fsspec URL of the shared object tier, e.g. s3://bucket/kv")
    remote_options: dict[str, Any] = Field(default_factory=dict, description="fsspec/s3fs options (endpoint_url, ...)")
    remote_write: Literal["through", "behind"] = Field("behind", description="upload before store() returns, or after")
    remote_timeout_s: float = Field(10.0, gt=0, description="deadline per object-store operation")
    remote_concurrency: int = Field(8, gt=0, description="object-store operations in flight")
    tp_rank: int = Field(0, ge=0, description="tensor-parallel rank; part of every key")
    tp_size: int = Field(1, gt=0, description="tensor-parallel size; part of every key")
    layout: str = Field("LPTHD", min_length=1, description="name of the engine's KV layout; part of every key")
    kv_shape: KVShape | None = Field(None, description="KV spec, when lookup() may come before any tensor")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics on this port")

    @field_validator("max_disk_bytes", "cpu_cache_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: Any, info: Any) -> Any:
        return parse_size(value, info.field_name)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not str(value).strip():
            raise ValueError("path must be a directory path, got an empty string")
        return os.path.abspath(os.path.expanduser(str(value)))

    @model_validator(mode="after")
    def _ranks(self) -> Config:
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} must be < tp_size {self.tp_size}")
        return self

    @classmethod
    def build(cls, values: dict[str, Any] | None = None, *, env: bool = True) -> Config:
        """Validate ``values`` with ``GDSCACHE_*`` overrides applied; errors name every bad field."""
        merged = dict(values or {})
        if env:
            merged.update(env_overrides())
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, env: bool = True) -> Config:
        """Load a YAML mapping of fields."""
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a YAML mapping of config fields, got {type(values).__name__}")
        return cls.build(values, env=env)


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Fields set by ``GDSCACHE_<FIELD>`` variables; JSON values (numbers, dicts) are decoded."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_FIELDS:
            continue
        field = name[len(ENV_PREFIX):].lower()
        if field not in Config.model_fields:
            raise ValueError(f"environment variable {name} names no config field; known: {', '.join(Config.model_fields)}")
        try:
            out[field] = json.loads(raw)
        except json.JSONDecodeError:
            out[field] = raw
    return out


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {where!r}; known keys: {', '.join(Config.model_fields)}")
        else:
            lines.append(f"config field {where!r}: {err['msg']} (got {err.get('input')!r})")
    return "invalid gdscache config: " + "; ".join(lines)
