"""The model families tightfit's code paths handle, and the GGUF <-> Hugging Face tensor naming."""

from __future__ import annotations

import gguf
import torch

from ..errors import UnsupportedArchitectureError

# transformers model_type -> GGUF architecture name
HF_TO_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
SUPPORTED_MODEL_TYPES = tuple(HF_TO_GGUF_ARCH)


def check_model_type(model_type: str | None, where: str) -> str:
    if model_type not in HF_TO_GGUF_ARCH:
        raise UnsupportedArchitectureError(
            f"{where} holds a {model_type!r} model; tightfit handles model types {list(SUPPORTED_MODEL_TYPES)}. "
            f"Use a model of one of those families, or open an issue for {model_type!r}."
        )
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
    """The transform a Hugging Face tensor goes through on its way into a GGUF file."""
    if config.model_type == "llama":
        if name.endswith("self_attn.q_proj.weight"):
            return permute_qk(w, config.num_attention_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return permute_qk(w, config.num_key_value_heads)
    if config.model_type == "gemma3_text" and name.endswith("norm.weight"):
        return w + 1  # Gemma's RMSNorm scales by (1 + w); GGUF stores the full gain
    return w


def from_gguf_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """Inverse of to_gguf_tensor."""
    if config.model_type == "llama":
        if name.endswith("self_attn.q_proj.weight"):
            return unpermute_qk(w, config.num_attention_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return unpermute_qk(w, config.num_key_value_heads)
    if config.model_type == "gemma3_text" and name.endswith("norm.weight"):
        return w - 1
    return w
