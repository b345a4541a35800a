"""gdscache: keep LLM KV-cache chunks on NVMe, WEKA or S3 and load them back faster than recomputing them."""

from gdscache.api import GDSCache
from gdscache.config import Config
from gdscache.pages import KVPages
from gdscache.spec import KVSpec

__version__ = "0.1.0"
__all__ = ["Config", "GDSCache", "KVPages", "KVSpec", "__version__"]
