"""Load a Hugging Face model folder (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import NotAModelError
from .arch import check_model_type


def check_hf_folder(path: Path):
    """The folder's config, once its model type, weights and tokenizer files are known to be there."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise NotAModelError(f"{path}/config.json could not be read as a model config ({e}). Fix or replace it.") from e
    check_model_type(getattr(config, "model_type", None), str(path))
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise NotAModelError(
            f"{path} has a config.json but no weights (*.safetensors). Pass a complete Hugging Face model folder."
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise NotAModelError(
            f"{path} has no tokenizer files (tokenizer.json or tokenizer.model). tightfit needs the tokenizer "
            "to evaluate a model; copy them from the model's source."
        )
    return config


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    check_hf_folder(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def save_hf(lm, out, *, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Write LoadedModel LM as a Hugging Face folder that plain `from_pretrained` reloads (atomically)."""
    from ..io import atomic_path

    out = Path(out)
    with atomic_path(out, directory=True, force=force) as tmp:
        # convert a copy of each tensor: casting the model itself would leave it rounded after the save
        state = {k: v.detach().to(dtype) for k, v in lm.model.state_dict().items()}
        lm.model.save_pretrained(tmp, state_dict=state)
        save_tokenizer(lm.tokenizer, lm.format, lm.path, tmp)
    return out


def save_tokenizer(tokenizer, source_format: str, source_path: Path, folder: Path) -> None:
    """Save a tokenizer; from a GGUF source, remember llama.cpp's pre-tokenizer name for a GGUF written back."""
    if source_format == "gguf":
        from .gguf_file import open_gguf

        field = open_gguf(source_path).fields.get("tokenizer.ggml.pre")
        if field is not None:
            tokenizer.init_kwargs["tightfit_gguf_pre"] = field.contents()
    tokenizer.save_pretrained(folder)
