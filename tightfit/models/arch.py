"""GGUF <-> Hugging Face tensor naming and llama.cpp's q/k row order (what each family needs is in families/)."""

from __future__ import annotations

import gguf
import torch


def check_model_type(model_type: str | None, where: str) -> str:
    """MODEL_TYPE if a family module handles it (models/families), else a typed error listing those that do."""
    from .families import family_of

    family_of(model_type, where)
    return model_type


def gguf_arch_enum(gguf_arch: str) -> gguf.MODEL_ARCH:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)


def hf_to_gguf_names(param_names, gguf_arch: str, n_layers: int) -> dict[str, str]:
    """Map Hugging Face parameter names to GGUF tensor names (names gguf-py's table does not know are left out)."""
    table = gguf.get_tensor_name_map(gguf_arch_enum(gguf_arch), n_layers)
    out = {}
    for name in param_names:
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is not None:
            out[name] = f"{mapped}.{suffix}"
    return out


# llama.cpp stores Llama's q/k rows interleaved for its rotary layout (convert_hf_to_gguf.py, LlamaModel.permute).
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face -> GGUF row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF -> Hugging Face row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """The transform a Hugging Face tensor goes through on its way into a GGUF file (the family's)."""
    from .families import family_of

    return family_of(config).to_gguf(name, w, config)


def from_gguf_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """Inverse of to_gguf_tensor."""
    from .families import family_of

    return family_of(config).from_gguf(name, w, config)
