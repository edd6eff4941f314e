"""Qwen3 (dense): Qwen2's layer without q/k/v biases, with a per-head RMSNorm on q and k before RoPE, and an
explicit head_dim (128 even where hidden / heads is not)."""

from . import Family

QWEN3 = Family("qwen3", ("qwen3",), "qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")

FAMILIES = (QWEN3,)
