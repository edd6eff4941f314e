"""Weight and KV-cache formats, described as data."""

from .kv import KV_FORMATS, KVFormat
from .weight import GGML_EXACT, WeightFormat, pack, unpack

__all__ = ["GGML_EXACT", "KV_FORMATS", "KVFormat", "WeightFormat", "pack", "unpack"]
