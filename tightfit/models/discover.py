"""Find the models this install can see: named models from installed packages, and model files in folders."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .registry import NAMED_MODELS, locate


@dataclass(frozen=True)
class FoundModel:
    name: str  # what to pass as MODEL
    path: Path | None
    format: str  # "gguf", "hf", "artifact", or "-" when not installed
    size_bytes: int
    detail: str  # tensor types, architecture, or how to install


def _gguf_detail(path: Path) -> str:
    from ..errors import TightfitError
    from .gguf_file import field_contents, open_gguf

    try:
        r = open_gguf(path)
    except Exception as e:  # a listing must not die on one bad file
        return f"unreadable: {e}"
    try:
        arch = field_contents(r.fields.get("general.architecture"), path) or "?"
    except TightfitError as e:
        return f"unreadable: {e}"
    types = Counter(t.tensor_type.name for t in r.tensors)
    if not types:
        return f"{arch}, no tensors (vocabulary only)"
    return f"{arch}, " + ", ".join(f"{n} {k}" for k, n in types.most_common())


def _hf_detail(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable config.json: {e}"
    return f"{cfg.get('model_type', '?')}, {cfg.get('torch_dtype') or cfg.get('dtype') or '?'}"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def discover(folders: list[Path] = ()) -> list[FoundModel]:
    found = []
    for name, named in NAMED_MODELS.items():
        path = locate(named)
        if path is None:
            found.append(FoundModel(name, None, "-", 0, f"not installed: {named.install_command}"))
        else:
            found.append(FoundModel(name, path, "gguf", _size(path), _gguf_detail(path)))
    for folder in folders:
        for p in sorted(Path(folder).rglob("*.gguf")):
            found.append(FoundModel(str(p), p, "gguf", _size(p), _gguf_detail(p)))
        for cfg in sorted(Path(folder).rglob("config.json")):
            manifest = cfg.parent / "manifest.json"
            if manifest.is_file():
                try:
                    m = json.loads(manifest.read_text())
                    detail = f"tightfit artifact, {m['method']}, {m['bits_per_weight']:.3f} bits per weight"
                except (OSError, ValueError, KeyError) as e:
                    detail = f"unreadable manifest: {e}"
                found.append(FoundModel(str(cfg.parent), cfg.parent, "artifact", _size(cfg.parent), detail))
            elif any(cfg.parent.glob("*.safetensors")):
                found.append(FoundModel(str(cfg.parent), cfg.parent, "hf", _size(cfg.parent), _hf_detail(cfg.parent)))
    return found
