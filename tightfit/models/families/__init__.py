"""What tightfit knows about each model family, in one place: one module per family, read by quantization,
the layered reference forward, the runtime, the planner and both exporters.

A family says which tensors a decoder layer holds and what they do (the roles below), which linears read the
same input (one Hessian, one AWQ scale, one fused runtime matmul), which rescalings preserve the function,
how its config maps to the runtime's arguments, its GGUF architecture with the per-tensor transforms and
metadata llama.cpp expects, and which variant of the runtime's decode step runs it. Adding a family is one
module here (a Family value) plus its test in tests/test_families.py.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch

from ...errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ScalePair:
    """A function-preserving rescaling: SOURCE's output channels divided by s, TARGETS' input columns times s."""

    name: str
    source: str  # the op whose output channels are divided by s (a norm weight or a linear's rows)
    targets: tuple[str, ...]  # linears whose input columns are multiplied by s
    gqa: bool = False  # v_proj -> o_proj: s is per kv channel, expanded over the query heads sharing it


def llama_pairs(attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm") -> tuple:
    """The four pairs of a decoder layer with separate q/k/v and gate/up linears (Llama, Qwen, Gemma)."""
    return (
        ScalePair("attn_in", attn_norm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScalePair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), gqa=True),
        ScalePair("mlp_in", mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
        ScalePair("mlp_out", "mlp.up_proj", ("mlp.down_proj",)),
    )


@dataclass(frozen=True)
class Family:
    """A dense decoder-only family. Names are relative to a layer's prefix ("model.layers.{i}.") and carry no
    ".weight"; a norm of None is one the family does not have."""

    name: str
    model_types: tuple[str, ...]  # transformers' model_type values
    gguf_arch: str  # llama.cpp's architecture name
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one name: fused in the file
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # one name: fused, gate rows first
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None  # Gemma's sandwich norms: on the attention / MLP output before the residual
    post_mlp_norm: str | None = None
    q_norm: str | None = None  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    k_norm: str | None = None
    qk_norm_full: bool = False  # OLMoE: the q/k norms span all heads (q: heads x head_dim wide), not one head
    norm_offset: float = 0.0  # Gemma: a norm scales by (offset + w)
    act: str = "silu"  # the gate's activation: "silu" or "gelu_tanh"
    permute_qk: bool = False  # llama.cpp's llama architecture keeps q/k rows interleaved (convert_hf_to_gguf.py)
    gguf_swa: bool = False  # llama.cpp applies the config's sliding window in this architecture
    qkv_bias: bool = False  # q, k and v carry biases whatever the config says (Qwen2)
    gguf_output_required: bool = False  # llama.cpp's architecture has no tied-embedding fallback for output.weight
    pairs: tuple[ScalePair, ...] = field(default_factory=llama_pairs)
    limits: tuple[str, ...] = ()  # what tightfit does not (yet) do for this family, said where it matters
    moe: object = None  # families/moe.MoE: the MLP is a mixture of experts

    # ---- the layer's tensors ----
    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that read the same input, lead first: (q, k, v), (o,), (gate, up), (down,)."""
        return (self.qkv, (self.o,), self.gate_up, (self.down,))

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)

    def layer_groups(self, config, i: int) -> tuple[tuple[str, ...], ...]:
        """The input groups of layer i whose linears are nn.Linear modules of the layer (an MoE layer's experts
        are handled apart)."""
        return self.groups

    def is_moe_layer(self, config, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(config, i)

    def lead_of(self, linear: str) -> str:
        return next(g[0] for g in self.groups if linear in g)

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(n for n in (self.attn_norm, self.mlp_norm, self.post_attn_norm, self.post_mlp_norm,
                                 self.q_norm, self.k_norm) if n is not None)

    # ---- config -> sizes and per-layer attention ----
    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rotary_dim(self, config) -> int:
        factor = (rope_parameters(config, None) or {}).get("partial_rotary_factor",
                                                            getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        return int(self.head_dim(config) * factor)

    def embed_scale(self, config) -> float:
        return 1.0

    def attn_scale(self, config) -> float:
        return self.head_dim(config) ** -0.5

    def layer_types(self, config) -> list[str]:
        """"full_attention" or "sliding_attention" per layer (transformers' names)."""
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)[: config.num_hidden_layers]
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        return [kind] * config.num_hidden_layers

    def windows(self, config) -> list[int]:
        """Each layer's attention window in tokens (a query sees the last `window` positions), 0 for all."""
        w = getattr(config, "sliding_window", None) or 0
        return [int(w) if t == "sliding_attention" else 0 for t in self.layer_types(config)]

    def final_softcap(self, config) -> float | None:
        return getattr(config, "final_logit_softcapping", None)

    def check_config(self, config) -> None:
        """Refuse a config this family's code paths would get wrong."""
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedArchitectureError(f"{config.model_type}: attention logit soft-capping is not supported")
        if getattr(config, "clip_qkv", None) is not None:
            raise UnsupportedArchitectureError(f"{config.model_type}: clip_qkv is not supported; use a config without it")

    def rope_tables(self, config, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin [n, 1, rotary_dim] per layer type, rope scaling by transformers' own init functions (importing
        only modeling_rope_utils, not the modeling modules, keeps ~50 MB of Python out of the runtime)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        out = {}
        rot = self.rotary_dim(config)
        for kind in sorted(set(self.layer_types(config))):
            params = rope_parameters(config, kind) or {}
            rope_type = params.get("rope_type", "default")
            if rope_type == "default":
                theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
                inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
                scaling = 1.0
            else:
                kw = {"layer_type": kind} if _nested_rope(config) else {}
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, **kw)
            freqs = torch.arange(n, dtype=torch.float)[:, None] * inv_freq.float()[None]
            emb = torch.cat((freqs, freqs), dim=-1)
            out[kind] = ((emb.cos() * scaling)[:, None], (emb.sin() * scaling)[:, None])
        return out

    # ---- GGUF ----
    def to_gguf(self, name: str, w: torch.Tensor, config) -> torch.Tensor:
        """The transform a Hugging Face tensor goes through on its way into a GGUF file."""
        return self._gguf_transform(name, w, config, inverse=False)

    def from_gguf(self, name: str, w: torch.Tensor, config) -> torch.Tensor:
        return self._gguf_transform(name, w, config, inverse=True)

    def _gguf_transform(self, name: str, w: torch.Tensor, config, inverse: bool) -> torch.Tensor:
        """llama.cpp's q/k row order (llama architecture) and full norm gains (Gemma), or their inverses."""
        from ..arch import permute_qk, unpermute_qk

        if self.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            return (unpermute_qk if inverse else permute_qk)(w, heads)
        if self.norm_offset and name.endswith("norm.weight"):
            return w - self.norm_offset if inverse else w + self.norm_offset  # GGUF stores the full gain
        return w

    def gguf_metadata(self, w, config) -> None:
        """Architecture keys beyond the common ones (gguf.GGUFWriter w): the sliding window, rope scaling."""
        import gguf

        windows = [x for x in self.windows(config) if x]
        if windows and self.gguf_swa:
            w.add_sliding_window(windows[0])
        params = rope_parameters(config, "full_attention") or {}
        w.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        if params.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(params["factor"]))

    def gguf_extra_tensors(self, config) -> dict:
        """GGUF tensors with no Hugging Face parameter: Llama 3.1's rope frequency factors (llama.cpp divides
        each rotary frequency by its factor; the same smoothing transformers' "llama3" init applies)."""
        import numpy as np

        params = rope_parameters(config, "full_attention") or {}
        if params.get("rope_type") != "llama3":
            return {}
        rot, theta = self.rotary_dim(config), params.get("rope_theta", 10000.0)
        freqs = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0, 1)
        out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
        return {"rope_freqs.weight": out.astype(np.float32)}

    def gguf_warnings(self, config) -> list[str]:
        windows = sorted({x for x in self.windows(config) if x})
        if windows and not self.gguf_swa:
            return [f"llama.cpp runs the {self.gguf_arch} architecture without a sliding window: the exported file "
                    f"matches this model only up to {windows[0]} tokens of context"]
        return []

    def check_export(self, config, target: str) -> None:
        """A typed error where TARGET ("gguf", "compressed-tensors") cannot take this model."""
        if target == "gguf":
            kinds = {(rope_parameters(config, k) or {}).get("rope_type", "default") for k in set(self.layer_types(config))}
            if kinds - {"default", "linear", "llama3"}:
                raise UnsupportedArchitectureError(
                    f"rope scaling {sorted(kinds - {'default'})} is not written to GGUF yet; tightfit writes plain, "
                    "linear and llama3 rotary embeddings. Export to compressed-tensors (vLLM) instead.")


def rope_parameters(config, layer_type: str | None) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    if params and _nested_rope(config):
        key = layer_type or "full_attention"
        return params.get(key) or next(iter(params.values()))
    return params


def _nested_rope(config) -> bool:
    params = getattr(config, "rope_parameters", None) or {}
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def _registry() -> dict[str, Family]:
    from . import gemma3, llama, moe, phi3, qwen2, qwen3

    out = {}
    for module in (llama, qwen2, qwen3, gemma3, phi3, moe):
        for fam in module.FAMILIES:
            for t in fam.model_types:
                out[t] = fam
    return out


_FAMILIES: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    """model_type -> Family, every family tightfit handles."""
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _registry()
    return _FAMILIES


def supported_model_types() -> tuple[str, ...]:
    return tuple(families())


def family_of(config_or_type, where: str = "the model") -> Family:
    """The Family of a config (or a model_type string); a typed error naming the supported types and the
    closest one otherwise."""
    model_type = config_or_type if isinstance(config_or_type, str) or config_or_type is None \
        else getattr(config_or_type, "model_type", None)
    fam = families().get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        known = list(families())
        close = difflib.get_close_matches(str(model_type), known, n=1, cutoff=0.3)
        hint = f" The closest supported type is {close[0]!r}." if close else ""
        raise UnsupportedArchitectureError(
            f"{where} holds a {model_type!r} model; tightfit handles model types {known}.{hint} Use a model of "
            f"one of those families, or add a module for {model_type!r} under tightfit/models/families/.")
    if not isinstance(config_or_type, str):
        fam.check_config(config_or_type)
    return fam


def embed_scale_value(fam: Family, config) -> float:
    s = fam.embed_scale(config)
    return 1.0 if s is None or math.isclose(s, 1.0) else float(s)


__all__ = ["Family", "ScalePair", "family_of", "families", "supported_model_types", "llama_pairs", "rope_parameters"]
