"""The CPU runtime: packed low-bit weights on torch's int4 kernel, a lean Llama/Qwen2 forward, a KV cache,
sampling and generation."""

from __future__ import annotations

import os

from .generate import Step, generate
from .sampling import SamplingParams


def load_runtime(source: str | os.PathLike, kv_format: str = "bf16", progress: bool = False,
                 max_memory: int | None = None, kernel: str = "auto"):
    """A LoadedModel whose `.model` is the runtime Engine (what `run`, `serve` and `eval` of an artifact use)."""
    from ..models import LoadedModel
    from .load import load_engine

    engine, tokenizer, kind, manifest = load_engine(source, kv_format, progress, max_memory=max_memory, kernel=kernel)
    return LoadedModel(engine, tokenizer, os.fspath(source), engine.info.get("path"), kind, manifest)


__all__ = ["SamplingParams", "Step", "generate", "load_runtime"]
