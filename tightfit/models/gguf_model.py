"""Build a transformers model from a GGUF file, dequantizing one tensor at a time from the memory map."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import GGUFFormatError
from .arch import from_gguf_tensor, hf_to_gguf_names
from .gguf_file import architecture, dequantize, open_gguf

log = logging.getLogger(__name__)


def load_gguf(path: Path, progress: bool = False, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file. Peak memory is the dequantized model plus one tensor."""
    reader = open_gguf(path)
    gguf_arch = architecture(reader, path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = hf_to_gguf_names(skeleton.state_dict().keys(), gguf_arch, config.num_hidden_layers)
    by_gguf = {g: h for h, g in names.items()}
    if config.tie_word_embeddings:
        by_gguf.pop("output.weight", None)

    state = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        hf_name = by_gguf.get(t.name)
        if hf_name is None:
            log.info("GGUF tensor %s has no place in the model; skipped", t.name)
            continue
        w = from_gguf_tensor(hf_name, dequantize(t), config).to(dtype)
        expected = tuple(skeleton.get_parameter(hf_name).shape)
        if tuple(w.shape) != expected:
            raise GGUFFormatError(
                f"{path}: tensor {t.name!r} has shape {tuple(w.shape)} but the model's metadata implies {expected}. "
                "The file's metadata and tensors disagree; export it again."
            )
        state[hf_name] = w
    missing = [h for g, h in by_gguf.items() if h not in state]
    if missing:
        raise GGUFFormatError(
            f"{path} lacks tensors the {gguf_arch} architecture needs: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. The file is incomplete; export it again."
        )
    model = type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model, tokenizer
