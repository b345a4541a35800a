"""The benchmark behind ``gdscache bench``: GDSCache store/retrieve against the raw ceiling of the same path."""

from gdscache.bench.engine import BenchOptions, plan_steps, run_bench
from gdscache.bench.models import PRESETS, ModelShape, resolve_model

__all__ = ["PRESETS", "BenchOptions", "ModelShape", "plan_steps", "resolve_model", "run_bench"]
