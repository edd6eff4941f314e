"""KV-cache formats: how many bytes a cached key/value element costs, and how it is grouped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int
    group: str  # "none" (a float dtype), "head" (one scale+zero per head vector per token)
    scale_bytes: int = 0  # per group: scale and zero, each this many bytes

    def bytes_per_token(self, n_layers: int, n_kv_heads: int, head_dim: int) -> float:
        """Bytes one token's keys and values take across all layers."""
        per_vector = head_dim * self.bits / 8 + (2 * self.scale_bytes if self.group == "head" else 0)
        return 2 * n_layers * n_kv_heads * per_vector


KV_FORMATS = {f.name: f for f in [
    KVFormat("fp32", 32, "none"),
    KVFormat("bf16", 16, "none"),
    KVFormat("fp16", 16, "none"),
    KVFormat("fp8", 8, "none"),  # vLLM's --kv-cache-dtype fp8 (e4m3, one scale per layer)
    KVFormat("int8", 8, "head", 2),
    KVFormat("int4", 4, "head", 2),
]}
