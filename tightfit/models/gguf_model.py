"""Build a transformers model from a GGUF file, dequantizing one tensor at a time from the memory map."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .lazy import build, lazy_gguf


def load_gguf(path: Path, progress: bool = False, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file. Peak memory is the dequantized model plus one tensor."""
    lazy = lazy_gguf(path)
    state = {name: get().to(dtype) for name, get in
             tqdm(lazy.loaders.items(), desc=f"loading {path.name}", unit="tensor", disable=not progress)}
    return build(lazy, state, dtype), lazy.tokenizer
