"""Load a model from a Hugging Face folder, a GGUF file, or a known name into a torch model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError, NotAModelError
from .registry import DEFAULT_MODEL, NAMED_MODELS, resolve


@dataclass
class LoadedModel:
    """A model ready to run: a transformers causal LM in fp32 on the CPU, its tokenizer, and where it came from."""

    model: "torch.nn.Module"  # noqa: F821
    tokenizer: "PreTrainedTokenizerBase"  # noqa: F821
    source: str  # what the user passed
    path: Path  # the file or folder it was read from
    format: str  # "gguf" or "hf"

    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        return self.source


def resolve_source(source: str | os.PathLike) -> tuple[Path, str]:
    """Where a model source lives and what kind it is ("gguf" or "hf"); raises a typed error otherwise."""
    text = os.fspath(source)
    if text in NAMED_MODELS:
        return resolve(text), "gguf"
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {text!r} not found: no such file or folder, and not a known model name "
            f"({', '.join(NAMED_MODELS)}). Pass a .gguf file, a Hugging Face model folder, or a known name; "
            "`tightfit models` lists what this install can find."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotAModelError(
                f"{path} is a folder but not a model: it has no config.json. Pass a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files) or a .gguf file."
            )
        return path, "hf"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF" or path.suffix.lower() == ".gguf":
        return path, "gguf"  # a wrong magic in a .gguf file is reported by the GGUF reader
    raise NotAModelError(
        f"{path} is not a model: expected a .gguf file or a Hugging Face model folder, got a file starting "
        f"with {head!r}."
    )


def load(source: str | os.PathLike = DEFAULT_MODEL, progress: bool = False) -> LoadedModel:
    """Load a model for evaluation or quantization: `load("smollm2-135m")`, `load("model.gguf")`, `load("dir/")`."""
    path, kind = resolve_source(source)
    if kind == "gguf":
        from .gguf_model import load_gguf

        model, tokenizer = load_gguf(path, progress=progress)
    else:
        from .hf import load_hf

        model, tokenizer = load_hf(path)
    model.eval()
    return LoadedModel(model, tokenizer, os.fspath(source), path, kind)


__all__ = ["LoadedModel", "load", "resolve_source", "DEFAULT_MODEL", "NAMED_MODELS"]
