"""The quantized artifact: a folder with packed weights (safetensors), a manifest, config and tokenizer.

manifest.json records per tensor its format, shape, stored bytes and the quantizer's own error; overall the
bits per weight (every stored byte x 8 / unique parameters), the source model's hash, the calibration text's
hash, the config that made it, and the tightfit version. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ArtifactError, FormatError
from ..formats.size import bits_per_weight
from ..formats.weight import WeightFormat, decode_scales, encode_scales
from ..io import atomic_path, write_safetensors
from ..models.hf import save_tokenizer
from .calibrate import QuantizedModel
from .core import QuantizedWeight

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _tensors_of(qm: QuantizedModel) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, entries = {}, {}
    for name, qw in qm.weights.items():
        tensors[f"{name}.qweight"] = qw.packed_bytes
        stored = tensors[f"{name}.qweight"].numel()
        scales = encode_scales(qw.scales, qw.mins, qw.fmt) if qw.fmt.superblock else \
            {"scales": qw.scales, "mins": qw.mins}
        for key, t in scales.items():
            if t is not None:
                tensors[f"{name}.{key}"] = t.contiguous()
                stored += t.numel() * t.element_size()
        if qw.g_idx is not None:
            tensors[f"{name}.g_idx"] = qw.g_idx.contiguous()
            stored += qw.g_idx.numel() * qw.g_idx.element_size()
        entries[name] = {"format": qw.fmt.name, "shape": list(qw.shape), "size_bytes": stored,
                         "parameters": qw.shape[0] * qw.shape[1], "bits_per_weight": stored * 8 / (qw.shape[0] * qw.shape[1]),
                         "g_idx": qw.g_idx is not None, "ggml_type": qw.fmt.ggml_type if qw.g_idx is None else None,
                         "error": qw.error}
    for name, t in qm.kept.items():
        tensors[name] = t.contiguous()
        entries[name] = {"format": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                         "size_bytes": t.numel() * t.element_size(), "parameters": t.numel()}
    return tensors, entries


def save_artifact(out: str | Path, qm: QuantizedModel, lazy, *, calibration: dict | None, source: str,
                  extra: dict | None = None, force: bool = False) -> dict:
    from .. import __version__

    tensors, entries = _tensors_of(qm)
    manifest = {
        "tightfit_version": __version__,
        "format_version": FORMAT_VERSION,
        "source": {"model": source, "path": str(lazy.path), "sha256": file_sha256(lazy.path)},
        "calibration": calibration,
        "method": qm.config.method,
        "config": qm.config.to_dict(),
        "bits_per_weight": bits_per_weight({n: (e["size_bytes"], e["parameters"]) for n, e in entries.items()}),
        "size_bytes": sum(e["size_bytes"] for e in entries.values()),
        "parameters": sum(e["parameters"] for e in entries.values()),
        "tied_embeddings": bool(lazy.config.tie_word_embeddings),
        "tensors": entries,
        **(extra or {}),
    }
    with atomic_path(out, directory=True, force=force) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS,
                          metadata={"format": "tightfit", "format_version": str(FORMAT_VERSION)})
        lazy.config.save_pretrained(tmp)
        save_tokenizer(lazy.tokenizer, lazy.format, lazy.path, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a folder with a manifest is complete
    return manifest


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=2)
    format: str
    error: dict = {}


class _Manifest(BaseModel):
    """The manifest fields readers rely on, with their types; anything else in it is informational."""
    model_config = ConfigDict(extra="allow")
    format_version: int
    tensors: dict[str, _Entry]
    bits_per_weight: float
    source: dict | str


def _check_manifest(manifest, where: Path) -> None:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} holds {type(manifest).__name__}, not a JSON object; the artifact is corrupt. "
                            "Quantize it again.")
    for key in ("format_version", "tensors", "bits_per_weight", "source"):
        if key not in manifest:
            raise ArtifactError(f"{where} lacks {key!r}; the artifact is corrupt. Quantize it again.")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ArtifactError(f"{where}: {loc}: {first['msg']}; the artifact is corrupt. Quantize it again.") from None


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path / MANIFEST} cannot be read ({e}); the artifact is corrupt. Quantize it again.") from e
    _check_manifest(manifest, path / MANIFEST)
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {manifest['format_version']}, this tightfit reads "
                            f"{FORMAT_VERSION}. Quantize it again with this version.")
    return manifest


def _check_group_tensors(fmt: WeightFormat, shape, scales, mins, g_idx) -> None:
    """A plain group format's scales (and mins, g_idx) as its shape needs them: float [rows, groups], g_idx int
    [columns] naming existing groups (found by fuzzing: packed super-block codes read as scales indexed out of
    bounds)."""
    rows, cols = shape
    want = (rows, fmt.groups(cols))
    for key, t in (("scales", scales), ("mins", mins)):
        if key == "mins" and fmt.symmetric:
            continue
        if t is None or tuple(t.shape) != want or not t.is_floating_point():
            got = "nothing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            raise FormatError(f"{fmt.name} {list(shape)}: its {key} should be float {list(want)}, found {got}")
    if g_idx is not None and (tuple(g_idx.shape) != (cols,) or g_idx.is_floating_point() or (
            cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= want[1]))):
        raise FormatError(f"{fmt.name} {list(shape)}: its g_idx should be {cols} group indices below {want[1]}")


def open_quantized(path: Path):
    """(manifest, get): get(name) reads one tensor (a QuantizedWeight or a float tensor) from disk, checked
    against the manifest; nothing else is read, so a runtime with a memory budget can load layer by layer."""
    from safetensors import safe_open

    manifest = read_manifest(path)
    file = path / WEIGHTS
    try:
        with safe_open(file, framework="pt") as h:
            keys = set(h.keys())
    except Exception as e:
        raise ArtifactError(f"{file} cannot be read ({e}); the artifact is corrupt. Quantize it again.") from e

    def read(*names):
        # copies, not views of the memory map: a view would keep the file's touched pages resident
        with safe_open(file, framework="pt") as h:
            return [h.get_tensor(n).clone() if n in keys else None for n in names]

    def get(name: str):
        e = manifest["tensors"].get(name)
        if e is None:
            raise ArtifactError(f"{path}: the model needs tensor {name} but the manifest does not list it; the "
                                "artifact is incomplete or its manifest damaged. Quantize it again.")
        shape = tuple(e["shape"])
        if f"{name}.qweight" in keys:
            try:
                fmt = WeightFormat.parse(e["format"])
            except FormatError as err:
                raise ArtifactError(f"{path}: tensor {name} has an unknown format {e['format']!r}") from err
            packed, scales, mins, g_idx, sup = read(f"{name}.qweight", f"{name}.scales", f"{name}.mins",
                                                     f"{name}.g_idx", f"{name}.super")
            if len(shape) != 2 or packed.shape != (shape[0], shape[1] * fmt.bits // 8):
                raise ArtifactError(f"{path}: tensor {name} holds {tuple(packed.shape)} packed bytes but the manifest "
                                    f"says {e['format']} {list(shape)}; the manifest does not match the weights.")
            try:
                if fmt.superblock:
                    fmt.check_shape(shape, name)
                    scales, mins = decode_scales({"scales": scales, "mins": mins, "super": sup}, fmt, shape)
                else:
                    _check_group_tensors(fmt, shape, scales, mins, g_idx)
            except FormatError as err:
                raise ArtifactError(f"{path}: tensor {name}: {err}; the artifact is corrupt. Quantize it "
                                    "again.") from err
            return QuantizedWeight(fmt, packed, scales, mins, g_idx, e.get("error", {}), in_features=shape[1],
                                   packed=True)
        if name in keys:
            (t,) = read(name)
            if tuple(t.shape) != shape:
                raise ArtifactError(f"{path}: tensor {name} has shape {tuple(t.shape)} but the manifest "
                                    f"says {list(shape)}; the manifest does not match the weights.")
            return t
        raise ArtifactError(f"{path}: the manifest lists {name} but {WEIGHTS} does not hold it; the artifact "
                            "is incomplete. Quantize it again.")

    return manifest, get


def load_quantized(path: Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(manifest, quantized weights, kept tensors), each checked against the manifest."""
    manifest, get = open_quantized(path)
    qweights, kept = {}, {}
    for name in manifest["tensors"]:
        t = get(name)
        (qweights if isinstance(t, QuantizedWeight) else kept)[name] = t
    return manifest, qweights, kept


def load_artifact(path: Path):
    """(model, tokenizer, manifest) with every weight dequantized to fp32 (the reference for the runtime)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest, qweights, kept = load_quantized(path)
    config = AutoConfig.from_pretrained(path)
    state = {name: qw.dequantize() for name, qw in qweights.items()}
    state.update({k: v.float() for k, v in kept.items()})
    from ..models.families import family_of

    moe = family_of(config, str(path)).moe
    if moe is not None:  # one tensor per expert -> transformers' 3-D expert parameters
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            names = [moe.expert_name(p, e, q) for e in range(moe.n_experts(config))
                     for q in ("gate_proj", "up_proj", "down_proj")]
            if all(n in state for n in names):
                parts = {n: state.pop(n) for n in names}
                E = moe.n_experts(config)
                state[f"{p}mlp.experts.gate_up_proj"] = torch.stack(
                    [torch.cat([parts[moe.expert_name(p, e, "gate_proj")], parts[moe.expert_name(p, e, "up_proj")]])
                     for e in range(E)])
                state[f"{p}mlp.experts.down_proj"] = torch.stack([parts[moe.expert_name(p, e, "down_proj")]
                                                                  for e in range(E)])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = set(skeleton.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(state) != expected:
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ArtifactError(f"{path}: the manifest does not match the model: missing {missing[:3]}, unexpected "
                            f"{unknown[:3]}. Quantize it again.")
    model = type(skeleton).from_pretrained(None, config=config, state_dict=state)
    return model, AutoTokenizer.from_pretrained(path), manifest
