"""Qwen2 / Qwen2.5: Llama's layer with biases on q, k and v; no q/k permutation in GGUF (NeoX rotary)."""

from . import Family

QWEN2 = Family("qwen2", ("qwen2",), "qwen2", qkv_bias=True)

FAMILIES = (QWEN2,)
