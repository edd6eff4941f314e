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
    except Exception as e:  # transformers' config classes raise whatever a field's validation hit
        raise NotAModelError(f"{path}/config.json could not be read as a model config ({type(e).__name__}: "
                             f"{str(e)[:200]}). Fix or replace it.") from e
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


def save_hf_streamed(lazy, out, *, dtype: torch.dtype = torch.float32, force: bool = False, layer_hook=None,
                     rest_hook=None, progress: bool = False) -> Path:
    """Write a LazyModel as a sharded Hugging Face folder, one decoder layer at a time (atomically): peak
    memory is one layer in fp32, whatever the model's size. layer_hook(state, i) may change layer i's tensors
    in place before they are written (the off-grid rescaling), rest_hook(state) the embedding, final norm and
    head (a rotation; it may add tensors, e.g. untie the head). One shard per layer plus one for the rest, with
    the index `from_pretrained` reads."""
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..io import atomic_path, return_free_heap

    out = Path(out)
    L = lazy.config.num_hidden_layers
    names = list(lazy.loaders)
    rest = [n for n in names if not n.startswith("model.layers.")]
    n_shards = L + 1
    weight_map, total = {}, 0
    with atomic_path(out, directory=True, force=force) as tmp:
        for i in tqdm(range(n_shards), desc="writing", unit="shard", disable=not progress):
            if i < L:
                state = lazy.materialize(f"model.layers.{i}.")
                if layer_hook is not None:
                    layer_hook(state, i)
            else:
                state = {n: lazy.get(n) for n in rest}
                if rest_hook is not None:
                    rest_hook(state)
            file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            for k, v in tensors.items():
                weight_map[k] = file
                total += v.numel() * v.element_size()
            del state, tensors
            return_free_heap()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        lazy.config.save_pretrained(tmp)
        save_tokenizer(lazy.tokenizer, lazy.format, lazy.path, tmp)
    return out


def save_tokenizer(tokenizer, source_format: str, source_path: Path, folder: Path) -> None:
    """Save a tokenizer; from a GGUF source, remember llama.cpp's pre-tokenizer name for a GGUF written back."""
    if source_format == "gguf":
        from .gguf_file import field_contents, open_gguf

        field = open_gguf(source_path).fields.get("tokenizer.ggml.pre")
        if field is not None:
            tokenizer.init_kwargs["tightfit_gguf_pre"] = field_contents(field, source_path)
    tokenizer.save_pretrained(folder)
