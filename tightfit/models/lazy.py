"""A model's weights as a lazy source: the config, the tokenizer, a skeleton on the meta device, and one loader
per tensor (a GGUF tensor dequantized from the memory map, or a safetensors slice). Nothing is read until asked,
so a job can hold one layer at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import GGUFFormatError, NotAModelError
from .arch import from_gguf_tensor, hf_to_gguf_names


@dataclass
class LazyModel:
    config: object
    tokenizer: object
    skeleton: torch.nn.Module  # on the meta device
    loaders: dict[str, Callable[[], torch.Tensor]]  # parameter name -> fp32 tensor
    path: Path
    format: str  # "gguf" | "hf"
    # mixture of experts: one 2-D tensor per expert (families/moe.py names), read apart from the 3-D parameters
    # transformers' layer holds (whose loaders stack them)
    experts: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    # parameter name -> the tensor in the dtype it is stored in (bf16 or fp16 safetensors); where absent, fp32
    stored: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor as stored where that is a float type fp32 holds exactly (bf16, fp16), else fp32: half the
        memory of get() for a large tensor that is only read in row blocks (a 7B model's embedding and head,
        2.2 GB each in fp32)."""
        return self.stored[name]() if name in self.stored else self.get(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.experts:
            return self.experts[name]()
        return self.loaders[name]()

    def materialize(self, module_prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {n: self.get(n).to(dtype) for n in self.loaders if n.startswith(module_prefix)}


# more routed experts per layer than any released model has (DeepSeek-V3 256, Qwen3-Next 512), with room
MAX_EXPERTS = 4096
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _skeleton(config, n_tensors: int, where) -> torch.nn.Module:
    """The model on the meta device; a config transformers cannot build a model from is a NotAModelError. Meta
    tensors cost nothing whatever their size, but each layer and expert is a Python module: a damaged config that
    claims 2^31 layers would build them until memory ran out (found by fuzzing GGUF files), so the layer count
    is held to the tensors the file really has (each layer has several) before anything is built."""
    from ..errors import TightfitError

    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or not 0 < layers <= n_tensors:
        raise NotAModelError(f"{where}: the config claims {layers!r} decoder layers but the weights hold "
                             f"{n_tensors} tensors (each layer has several); the config or metadata is damaged. "
                             "Download, convert or export the model again.")
    for key in EXPERT_KEYS:
        n = getattr(config, key, None)
        if n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_EXPERTS):
            raise NotAModelError(f"{where}: the config claims {n!r} experts per layer ({key}); expected at most "
                                 f"{MAX_EXPERTS}. The config or metadata is damaged; download or export it again.")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except TightfitError:
        raise
    except Exception as e:  # a size, activation or dtype field transformers' modules refuse
        raise NotAModelError(f"the model's config describes a model transformers cannot build ({type(e).__name__}: "
                             f"{str(e)[:200]}). Fix the config (config.json, or the GGUF's metadata).") from e


def lazy_gguf(path: Path) -> LazyModel:
    from .gguf_file import architecture, dequantize, hf_config, open_gguf

    reader = open_gguf(path)
    gguf_arch = architecture(reader, path)
    config, tokenizer = hf_config(path)
    skeleton = _skeleton(config, len(reader.tensors), path)
    names = hf_to_gguf_names(skeleton.state_dict().keys(), gguf_arch, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    loaders, experts = {}, {}
    from .families import family_of

    fam = family_of(config, str(path))
    if fam.moe is not None:
        _gguf_expert_loaders(path, fam, config, tensors, skeleton, loaders, experts)
    for hf_name, gguf_name in names.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = tensors.get(gguf_name)
        if t is None:
            raise GGUFFormatError(f"{path} lacks the tensor {gguf_name!r} ({hf_name}) that the {gguf_arch} "
                                  "architecture needs. The file is incomplete; export it again.")
        expected = tuple(skeleton.get_parameter(hf_name).shape)
        if tuple(reversed(t.shape.tolist())) != expected:
            raise GGUFFormatError(
                f"{path}: tensor {gguf_name!r} has shape {tuple(reversed(t.shape.tolist()))} but the model's "
                f"metadata implies {expected}. The file's metadata and tensors disagree; export it again.")
        loaders[hf_name] = (lambda t=t, n=hf_name: from_gguf_tensor(n, dequantize(t), config))
    return LazyModel(config, tokenizer, skeleton, loaders, path, "gguf", experts)


def _gguf_expert_loaders(path, fam, config, tensors: dict, skeleton, loaders: dict, experts: dict) -> None:
    """An MoE GGUF holds each layer's experts of one projection stacked in one 3-D tensor (ffn_*_exps): loaders
    of transformers' 3-D parameters from them, and of each expert's 2-D tensor (the last stack read is kept, so
    reading a layer's experts one by one dequantizes each stack once)."""
    from .gguf_file import dequantize

    moe, memo = fam.moe, {}

    def stack(gname: str) -> torch.Tensor:
        if gname not in memo:
            memo.clear()
            memo[gname] = dequantize(tensors[gname])
        return memo[gname]

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if not moe.is_moe_layer(config, i):
            continue
        g, u, d = (fam.gguf_expert_name(i, q) for q in ("gate_proj", "up_proj", "down_proj"))
        E, F, D = moe.n_experts(config), moe.ffn(config), config.hidden_size
        for gname, want in ((g, (E, F, D)), (u, (E, F, D)), (d, (E, D, F))):
            t = tensors.get(gname)
            if t is None:
                raise GGUFFormatError(f"{path} lacks the tensor {gname!r} that layer {i}'s experts need. The file "
                                      "is incomplete; export it again.")
            if tuple(reversed(t.shape.tolist())) != want:
                raise GGUFFormatError(f"{path}: tensor {gname!r} has shape {tuple(reversed(t.shape.tolist()))} but "
                                      f"the model's metadata implies {want}. Export it again.")
        loaders[f"{p}mlp.experts.gate_up_proj"] = (lambda g=g, u=u: torch.cat([dequantize(tensors[g]),
                                                                                dequantize(tensors[u])], 1))
        loaders[f"{p}mlp.experts.down_proj"] = (lambda d=d: dequantize(tensors[d]))
        for e in range(E):
            for proj, gname in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
                experts[moe.expert_name(p, e, proj)] = (lambda gname=gname, e=e: stack(gname)[e].clone())


def lazy_hf(path: Path) -> LazyModel:
    from safetensors import safe_open

    from .hf import check_hf_folder

    config = check_hf_folder(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotAModelError(f"{path} holds no *.safetensors weights; tightfit reads weights lazily from "
                             "safetensors only. Convert it: tightfit convert DIR -o NEW_DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raises whatever its parsing of the files hit
        raise NotAModelError(f"{path}: the tokenizer files could not be read ({type(e).__name__}: {str(e)[:200]}). "
                             "Copy them again from the model's source.") from e
    file_shapes = {f: safetensors_shapes(f) for f in files}
    skeleton = _skeleton(config, sum(len(s) for s in file_shapes.values()), path)
    from .families import family_of

    moe = family_of(config, str(path)).moe
    wanted = set(skeleton.state_dict().keys())
    loaders, experts, stored = {}, {}, {}
    for f in files:
        shapes = file_shapes[f]
        for k, shape in shapes.items():
            name = k if moe is None else moe.from_checkpoint(k)
            if name in wanted:
                expected = tuple(skeleton.get_parameter(name).shape)
            elif moe is not None and name.startswith("model.layers.") and ".mlp.experts." in name:
                expected = _expert_shape(name, config, moe)
            else:
                continue
            if shape != expected:
                raise NotAModelError(f"{f}: tensor {k} has shape {shape} but the config implies {expected}. "
                                     "The weights and config.json disagree; use the folder's own config.")
            (loaders if name in wanted else experts)[name] = (lambda f=f, k=k: _read_one(f, k))
            if name in wanted:
                stored[name] = (lambda f=f, k=k: _read_one(f, k, native=True))
    if moe is not None:
        _stacked_loaders(loaders, experts, wanted, config, moe)
    if config.tie_word_embeddings:
        loaders.pop("lm_head.weight", None)
    missing = sorted(wanted - set(loaders) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise NotAModelError(f"{path} lacks weights {missing[:5]}; the folder is incomplete.")
    return LazyModel(config, tokenizer, skeleton, loaders, path, "hf", experts,
                     {k: v for k, v in stored.items() if k in loaders})


def _expert_shape(name: str, config, moe) -> tuple[int, int]:
    F, D = moe.ffn(config), config.hidden_size
    return (D, F) if name.endswith("down_proj.weight") else (F, D)


def _stacked_loaders(loaders: dict, experts: dict, wanted: set, config, moe) -> None:
    """Loaders of transformers' 3-D expert parameters that stack the per-expert tensors when read; every
    expert tensor of an MoE layer must be there."""
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if f"{p}mlp.experts.down_proj" not in wanted:
            continue
        if f"{p}mlp.experts.down_proj" in loaders:  # saved in transformers' own 3-D layout: slice per expert
            F = moe.ffn(config)
            for e in range(moe.n_experts(config)):
                gu, dn = loaders[f"{p}mlp.experts.gate_up_proj"], loaders[f"{p}mlp.experts.down_proj"]
                experts[moe.expert_name(p, e, "gate_proj")] = (lambda gu=gu, e=e: gu()[e, :F].contiguous())
                experts[moe.expert_name(p, e, "up_proj")] = (lambda gu=gu, e=e: gu()[e, F:].contiguous())
                experts[moe.expert_name(p, e, "down_proj")] = (lambda dn=dn, e=e: dn()[e].contiguous())
            continue
        need = [moe.expert_name(p, e, proj) for e in range(moe.n_experts(config))
                for proj in ("gate_proj", "up_proj", "down_proj")]
        missing = [n for n in need if n not in experts]
        if missing:
            raise NotAModelError(f"the checkpoint lacks expert tensors {missing[:3]} "
                                 f"({moe.to_checkpoint(missing[0])} in its own names); the folder is incomplete.")
        get = (lambda n: experts[n]())
        loaders[f"{p}mlp.experts.gate_up_proj"] = (lambda p=p: torch.stack(
            [torch.cat([get(moe.expert_name(p, e, "gate_proj")), get(moe.expert_name(p, e, "up_proj"))])
             for e in range(moe.n_experts(config))]))
        loaders[f"{p}mlp.experts.down_proj"] = (lambda p=p: torch.stack(
            [get(moe.expert_name(p, e, "down_proj")) for e in range(moe.n_experts(config))]))


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; a damaged file is a NotAModelError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except (SafetensorError, OSError) as e:
        raise NotAModelError(f"{file} is not a readable safetensors file ({e}); it is truncated or damaged. "
                             "Download or convert it again.") from e


def _read_one(file: Path, key: str, native: bool = False) -> torch.Tensor:
    """One tensor in fp32, or with `native` in its stored dtype where that is bf16 or fp16."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as h:
            t = h.get_tensor(key)
            return t if native and t.dtype in (torch.bfloat16, torch.float16) else t.float()
    except (SafetensorError, OSError) as e:
        raise NotAModelError(f"{file}: tensor {key} could not be read ({e}); the file is truncated or damaged. "
                             "Download or convert it again.") from e


def build(lazy: LazyModel, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ready model from a full state dict (shared storage, no copy)."""
    return type(lazy.skeleton).from_pretrained(None, config=lazy.config, state_dict=state, dtype=dtype)


def lazy_from_loaded(lm) -> LazyModel:
    """A LazyModel over the weights of a loaded model (LoadedModel), each read as a copy."""
    import copy

    state = {k: v.detach() for k, v in lm.model.state_dict().items()}
    with torch.device("meta"):
        skeleton = type(lm.model)(copy.deepcopy(lm.config))
    loaders = {k: (lambda v=v: v.float().clone()) for k, v in state.items()
               if not (k == "lm_head.weight" and lm.config.tie_word_embeddings)}
    return LazyModel(lm.config, lm.tokenizer, skeleton, loaders, lm.path, lm.format)
