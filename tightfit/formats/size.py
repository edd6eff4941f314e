"""One size measure for every artifact and file: stored bytes x 8 / unique parameters.

A tied embedding/head counts once (it is stored once); norms, biases, scales and zeros all count.
"""

from __future__ import annotations

from pathlib import Path


def bits_per_weight(sizes: dict[str, tuple[int, int]]) -> float:
    """sizes: tensor name -> (stored bytes, parameters)."""
    total_bytes = sum(b for b, _ in sizes.values())
    params = sum(n for _, n in sizes.values())
    return total_bytes * 8 / params


def gguf_sizes(path: str | Path) -> dict[str, tuple[int, int]]:
    from ..models.gguf_file import open_gguf

    return {t.name: (int(t.n_bytes), int(t.n_elements)) for t in open_gguf(path).tensors}


def gguf_bits_per_weight(path: str | Path) -> float:
    return bits_per_weight(gguf_sizes(path))
