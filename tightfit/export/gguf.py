"""GGUF files that llama.cpp reads, architecture metadata, tokenizer and chat template included: the shared
writer, and F16 export of any loaded model. Tensors are produced and written one at a time."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from ..errors import UnsupportedArchitectureError
from ..io import atomic_path
from ..models.arch import hf_to_gguf_names, to_gguf_tensor
from ..models.families import family_of
from ..models.gguf_file import field_contents, open_gguf

log = logging.getLogger(__name__)

def _add_architecture(w: gguf.GGUFWriter, config, name: str, file_type: int) -> None:
    fam = family_of(config, "the model to export")
    head_dim = fam.head_dim(config)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(fam.rotary_dim(config))
    fam.gguf_metadata(w, config)
    # what transformers' GGUF reader does not rebuild, for tightfit reading the file back (models/gguf_file.py)
    keep = {k: getattr(config, k) for k in ("model_type", "rope_parameters", "layer_types", "sliding_window",
                                             "query_pre_attn_scalar", "head_dim", "num_local_experts", "num_experts",
                                             "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                                             "shared_expert_intermediate_size", "mlp_only_layers",
                                             "decoder_sparse_step") if getattr(config, k, None) is not None}
    w.add_string("tightfit.config", json.dumps(keep))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)


def _copy_tokenizer_fields(w: gguf.GGUFWriter, source: Path) -> None:
    reader = open_gguf(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field_contents(field, source), vtype, sub_type=sub)


def _tokenizer_fields_from_hf(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) described the way llama.cpp's 'gpt2' tokenizer reads it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(
            f"the tokenizer is {model.get('type')!r}; F16 GGUF export from a Hugging Face folder handles byte-level "
            "BPE tokenizers. Convert from the model's GGUF instead, which carries its tokenizer."
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise UnsupportedArchitectureError(
            f"the tokenizer has {len(vocab)} tokens but the model's output has only {n_vocab}; llama.cpp needs "
            "one token per output row. Fix the tokenizer or the model's vocab_size."
        )
    # rows past the tokenizer's last token (a padded embedding) become unused placeholder tokens, as llama.cpp's
    # converter writes them
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i < len(vocab)
             else gguf.TokenType.UNUSED for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    pre = getattr(tokenizer, "init_kwargs", {}).get("tightfit_gguf_pre", "default")
    if pre == "default":
        log.warning("no llama.cpp pre-tokenizer name is known for this tokenizer; writing 'default'")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    from ..eval.windows import adds_bos

    w.add_add_bos_token(adds_bos(tokenizer))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


@dataclass
class TensorEntry:
    """One tensor to write: its GGUF name, how it is stored, and how to produce its bytes when its turn comes."""

    name: str
    shape: tuple[int, ...]  # numpy shape; for block types the byte shape [rows, row_bytes]
    dtype: np.dtype
    nbytes: int
    make: Callable[[], np.ndarray]
    raw_type: gguf.GGMLQuantizationType | None = None


def gguf_names(config, param_names) -> dict[str, str]:
    """Hugging Face parameter name -> GGUF tensor name, for a model type llama.cpp reads."""
    fam = family_of(config, "the model to export")
    fam.check_export(config, "gguf")
    for msg in fam.gguf_warnings(config):
        log.warning(msg)
    arch = fam.gguf_arch
    param_names = [k for k in param_names if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    names = hf_to_gguf_names(param_names, arch, config.num_hidden_layers)
    unmapped = [k for k in param_names if k not in names]
    if unmapped:
        raise UnsupportedArchitectureError(f"no GGUF name for tensors {unmapped[:5]}; this model's layout is not "
                                           "one llama.cpp reads as " + arch)
    return names


def write_gguf(out: Path, config, name: str, tokenizer_fields: Callable[[gguf.GGUFWriter], None],
               entries: list[TensorEntry], file_type: int, force: bool = False, progress: bool = False) -> Path:
    """Write a GGUF file atomically, tensor data streamed one tensor at a time (with the family's extra
    tensors, such as Llama 3.1's rope factors)."""
    out = Path(out)
    for gname, arr in family_of(config).gguf_extra_tensors(config).items():
        entries = [*entries, TensorEntry(gname, arr.shape, arr.dtype, arr.nbytes, lambda a=arr: a)]
    with atomic_path(out, directory=False, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, family_of(config).gguf_arch)
        _add_architecture(w, config, name, file_type)
        tokenizer_fields(w)
        for e in entries:
            w.add_tensor_info(e.name, e.shape, e.dtype, e.nbytes, raw_dtype=e.raw_type)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e in tqdm(entries, desc=f"writing {out.name}", unit="tensor", disable=not progress):
            w.write_tensor_data(e.make())
        w.close()
    return out


def _f16_entries(config, shapes: dict[str, tuple], get: Callable) -> list[TensorEntry]:
    """One entry per tensor, in `shapes`' order: 2-D weights in F16, norms and other 1-D tensors in F32 (as
    llama.cpp keeps them), each read with get(name) when its turn to be written comes."""
    if family_of(config).moe is not None:
        raise UnsupportedArchitectureError(
            f"F16 GGUF conversion of mixture-of-experts models ({config.model_type}) is not written yet; quantize "
            "it and export the artifact (tightfit export ARTIFACT --format gguf), which stacks the experts.")
    entries = []
    for hf_name, gguf_name in gguf_names(config, list(shapes)).items():
        shape = shapes[hf_name]
        dtype = np.dtype(np.float16 if len(shape) == 2 else np.float32)
        make = (lambda n=hf_name, d=dtype: to_gguf_tensor(n, get(n).float(), config).numpy().astype(d))
        entries.append(TensorEntry(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, make))
    return entries


def write_gguf_f16_streamed(lazy, out: str | os.PathLike, name: str, *, layer_hook=None, force: bool = False,
                            progress: bool = False) -> Path:
    """Write a LazyModel as an F16 GGUF reading one decoder layer at a time (peak memory: one layer in fp32).
    layer_hook(state, i) may change layer i's tensors in place first (the off-grid rescaling; layers come in
    order, so its random draws equal the whole-model path's)."""
    import re

    config = lazy.config
    # the model's own order (layers 0, 1, 2, ... in turn), without the tied head
    shapes = {n: tuple(p.shape) for n, p in lazy.skeleton.state_dict().items() if n in lazy.loaders}
    held = {"layer": None, "state": {}}

    def tensor(n: str):
        m = re.match(r"model\.layers\.(\d+)\.", n)
        if m is None:
            return lazy.get(n)
        i = int(m.group(1))
        if held["layer"] != i:
            held["state"] = {}  # the previous layer is dropped before the next is read
            state = lazy.materialize(f"model.layers.{i}.")
            if layer_hook is not None:
                layer_hook(state, i)
            held.update(layer=i, state=state)
        return held["state"][n]

    entries = _f16_entries(config, shapes, tensor)
    return write_gguf(Path(out), config, name, tokenizer_writer(lazy), entries, gguf.LlamaFileType.MOSTLY_F16,
                      force, progress)


def tokenizer_writer(lm) -> Callable[[gguf.GGUFWriter], None]:
    if lm.format == "gguf":
        return lambda w: _copy_tokenizer_fields(w, lm.path)
    return lambda w: _tokenizer_fields_from_hf(w, lm.tokenizer, lm.config.vocab_size)


def write_gguf_f16(lm, out: str | os.PathLike, force: bool = False, progress: bool = False) -> Path:
    """Write LoadedModel LM to OUT as an F16 GGUF (norms and other 1-D tensors stay F32, as llama.cpp keeps them)."""
    state = lm.model.state_dict()
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    entries = _f16_entries(lm.config, shapes, lambda n: state[n].detach())
    return write_gguf(Path(out), lm.config, Path(lm.source).stem, tokenizer_writer(lm), entries,
                      gguf.LlamaFileType.MOSTLY_F16, force, progress)
