"""Load a model from a Hugging Face folder, a GGUF file, or a known name into a torch model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError, NotAModelError
from .registry import DEFAULT_MODEL, NAMED_MODELS, resolve


@dataclass
class LoadedModel:
    """A model ready to run: a transformers causal LM in fp32 on the CPU, its tokenizer, and where it came from."""

    model: torch.nn.Module  # noqa: F821
    tokenizer: PreTrainedTokenizerBase  # noqa: F821
    source: str  # what the user passed
    path: Path  # the file or folder it was read from
    format: str  # "gguf", "hf" or "artifact"
    manifest: dict | None = None  # for a tightfit artifact

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
        if (path / "manifest.json").is_file():
            return path, "artifact"
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
    if kind != "artifact":
        from ..memory import require

        require(parameter_count(path, kind) * 4 + (500 << 20), f"loading {os.fspath(source)} whole in fp32",
                "Verbs that stream layer by layer need far less: `tightfit eval` (with or without --base), "
                "`quantize`, `fit`; `tightfit run`/`serve` run it on the runtime (with --max-memory SIZE to "
                "stream what does not fit).")
    manifest = None
    if kind == "gguf":
        from .gguf_model import load_gguf

        model, tokenizer = load_gguf(path, progress=progress)
    elif kind == "artifact":
        from ..quant.artifact import load_artifact

        model, tokenizer, manifest = load_artifact(path)
    else:
        from .hf import load_hf

        model, tokenizer = load_hf(path)
    model.eval()
    return LoadedModel(model, tokenizer, os.fspath(source), path, kind, manifest)


def parameter_count(path: Path, kind: str) -> int:
    """Parameters a GGUF file or a safetensors folder holds, from its headers alone."""
    import math

    if kind == "gguf":
        from .gguf_file import open_gguf

        return sum(int(t.n_elements) for t in open_gguf(path).tensors)
    from .lazy import safetensors_shapes

    return sum(math.prod(shape) for f in sorted(path.glob("*.safetensors")) for shape in safetensors_shapes(f).values())


def load_lazy(source: str | os.PathLike):
    """A LazyModel (weights read on demand) for a GGUF file, a Hugging Face folder, or a known name."""
    from .lazy import lazy_gguf, lazy_hf

    path, kind = resolve_source(source)
    if kind == "artifact":
        raise NotAModelError(f"{path} is already a quantized tightfit artifact; quantize from its source model "
                             f"({json.loads((path / 'manifest.json').read_text())['source']['model']}).")
    return lazy_gguf(path) if kind == "gguf" else lazy_hf(path)


__all__ = ["DEFAULT_MODEL", "NAMED_MODELS", "LoadedModel", "load", "load_lazy", "resolve_source"]
