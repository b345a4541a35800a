"""Per-model ``cachegen`` profile: a quantization step per (layer, K/V) tensor and key-channel weights.

Stored as a small self-describing JSON file (``gdscache calibrate`` writes it, ``Config.codec_profile``
points at it). Steps are fractions of each token's per-head absmax; channel weights multiply the
step of one channel (1.0 = plain). Without a profile, :meth:`CodecProfile.default` applies one step
to every key tensor and a coarser one to every value tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gdscache.spec import KVSpec

FORMAT = "gdscache-codec-profile"
VERSION = 1
# Uncalibrated default: keys were 8-25x more KL-sensitive than values on measured models
# (../shared/KV_FIDELITY.md); these steps put the two near equal KL on SmolLM2.
DEFAULT_KEY_STEP = 0.05
DEFAULT_VALUE_STEP = 0.14
# Finest step: 1/127 of the absmax keeps every |q| <= 127 (the codec's symbol range), i.e. int8 resolution.
MIN_STEP = 1.0 / 127


@dataclass(frozen=True)
class CodecProfile:
    """``steps [L, P]`` and ``weights [L, P, H*D]`` for one model's KV shape."""

    steps: np.ndarray
    weights: np.ndarray
    model: str = ""
    calibration: dict | None = None

    def __post_init__(self) -> None:
        steps, weights = np.asarray(self.steps, np.float64), np.asarray(self.weights, np.float64)
        if steps.ndim != 2 or weights.ndim != 3 or weights.shape[:2] != steps.shape:
            raise ValueError(f"profile shapes disagree: steps {steps.shape}, channel weights {weights.shape}")
        if not (np.all(np.isfinite(steps)) and np.all(steps > 0) and np.all(np.isfinite(weights))
                and np.all(weights > 0)):
            raise ValueError("profile steps and channel weights must be finite and > 0")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "weights", weights)

    @classmethod
    def default(cls, spec: KVSpec) -> CodecProfile:
        steps = np.full((spec.num_layers, spec.kv_planes), DEFAULT_VALUE_STEP)
        steps[:, 0] = DEFAULT_KEY_STEP
        return cls(steps, np.ones((spec.num_layers, spec.kv_planes, spec.num_kv_heads * spec.head_dim)), "default")

    def digest(self) -> str:
        """16 hex digits naming the steps and weights exactly (goes into the key fingerprint); computed once."""
        if "_digest" not in self.__dict__:
            h = hashlib.sha256(self.steps.astype("<f8").tobytes() + self.weights.astype("<f8").tobytes())
            h.update(str(self.steps.shape + self.weights.shape).encode())
            object.__setattr__(self, "_digest", h.hexdigest()[:16])
        return self.__dict__["_digest"]

    def check(self, spec: KVSpec) -> None:
        want = (spec.num_layers, spec.kv_planes, spec.num_kv_heads * spec.head_dim)
        if self.weights.shape != want:
            raise ValueError(f"codec profile is for KV [layers, planes, channels] = {self.weights.shape}, "
                             f"this cache has {want}")

    def step_table(self, step_scale: float) -> np.ndarray:
        """fp32 ``[L, P, C]`` per-channel step factors ``steps * step_scale * weights``, at least ``MIN_STEP``
        (host, deterministic)."""
        return np.maximum(self.steps[:, :, None] * float(step_scale) * self.weights, MIN_STEP).astype(np.float32)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model,
                "num_layers": int(self.steps.shape[0]), "kv_planes": int(self.steps.shape[1]),
                "channels": int(self.weights.shape[2]), "steps": self.steps.tolist(),
                "channel_weights": [[None if np.all(w == 1.0) else w.tolist() for w in layer] for layer in self.weights],
                "calibration": self.calibration or {}}

    @classmethod
    def from_json(cls, d: dict) -> CodecProfile:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file (format={d.get('format')!r}, version={d.get('version')!r})")
        layers, planes, channels = int(d["num_layers"]), int(d["kv_planes"]), int(d["channels"])
        steps = np.asarray(d["steps"], np.float64).reshape(layers, planes)
        weights = np.ones((layers, planes, channels))
        for li, layer in enumerate(d["channel_weights"]):
            for pi, w in enumerate(layer):
                if w is not None:
                    weights[li, pi] = np.asarray(w, np.float64)
        return cls(steps, weights, str(d.get("model", "")), d.get("calibration") or None)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CodecProfile:
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_json(data)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read codec profile {path}: {exc}") from exc
