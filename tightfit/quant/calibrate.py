"""Layer-by-layer quantization: statistics for one decoder layer, quantize it, pass its quantized outputs on.

Weights come from a LazyModel, one layer at a time, so peak memory is about one layer plus the calibration
activations, and a model larger than RAM can be quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import QuantizeError
from ..models.layered import check_layered, drop_layer, load_layer, rotary, run_layer
from ..models.lazy import LazyModel
from .awq import awq_clip, awq_layer
from .config import GPTQ_METHODS, SCALED, QuantConfig
from .core import QuantizedWeight, rtn
from .equivalence import check_rescalable
from .gptq import gptq
from .hqq import hqq

# linears that read the same input share one Hessian; the first of each group is where it is measured
INPUT_GROUPS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
LINEARS = tuple(n for group in INPUT_GROUPS.values() for n in group)


@dataclass
class QuantizedModel:
    """Quantized weights by parameter name, the tensors kept as they were, and what was done."""

    weights: dict[str, QuantizedWeight]
    kept: dict[str, torch.Tensor]  # norms, biases: stored in full precision
    config: QuantConfig
    extra: dict


def quantize_one(w: torch.Tensor, fmt, cfg: QuantConfig, H: torch.Tensor | None, name: str) -> QuantizedWeight:
    fmt.check_shape(tuple(w.shape), name)
    if cfg.method in GPTQ_METHODS and H is not None:
        return gptq(w, H, fmt, act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp,
                    clip_search=cfg.clip_search)
    if cfg.method == "awq":
        return awq_clip(w, fmt, H)
    if cfg.method == "hqq":
        return hqq(w, fmt, H)
    return rtn(w, fmt, H)


def tied_hessian(H_head: torch.Tensor) -> torch.Tensor:
    """One matrix is both the embedding table and the output head, quantized once: its error is weighed half by
    the head's inputs, half unweighted (each embedding row is read as it is)."""
    return H_head / H_head.diagonal().mean() + torch.eye(H_head.shape[0])


class HessianHook:
    def __init__(self, n: int):
        self.H = torch.zeros(n, n, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.H += (x.T @ x).double()  # fp32 product per batch, fp64 sum across batches
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return (self.H / max(self.tokens, 1)).float()


def quantize_model(lazy: LazyModel, cfg: QuantConfig, calib: torch.Tensor | None, progress: bool = False) -> QuantizedModel:
    """calib: [samples, ctx] token ids (needed for gptq/awq; used by rtn/hqq only to report output error)."""
    from ..io import release_freed_memory_eagerly

    release_freed_memory_eagerly()
    config = lazy.config
    check_layered(config, f"quantizing ({cfg.method})")
    if cfg.method in SCALED:
        check_rescalable(config)
    if cfg.needs_calibration and calib is None:
        raise QuantizeError(f"{cfg.method} needs calibration text")
    weights: dict[str, QuantizedWeight] = {}
    kept: dict[str, torch.Tensor] = {}
    extra: dict = {"awq_scales": {}} if cfg.method in SCALED else {}
    embed = lazy.get("model.embed_tokens.weight")

    xs = pe = None
    if calib is not None:
        xs = embed[calib].to(cfg.calib_torch_dtype)  # [samples, ctx, hidden]
        pe = rotary(lazy, calib.shape[1], xs.dtype)

    steps = tqdm(range(config.num_hidden_layers), desc=f"quantizing ({cfg.method})", unit="layer",
                 disable=not progress)
    for i in steps:
        prefix = f"model.layers.{i}."
        state = lazy.materialize(prefix)
        hessians = {}
        if xs is not None:
            layer = load_layer(lazy, i, state, cfg.calib_torch_dtype)
            hooks = {n: HessianHook(layer.get_submodule(n).in_features) for n in INPUT_GROUPS}
            handles = [layer.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
            run_layer(layer, xs, pe)
            for h in handles:
                h.remove()
            hessians = {n: h.result() for n, h in hooks.items()}
        if cfg.method in SCALED:
            extra["awq_scales"][i] = awq_layer(state, prefix, hessians, cfg, config,
                                               lambda n: cfg.format_for(prefix + n + ".weight"))
        for lead, group in INPUT_GROUPS.items():
            for n in group:
                name = f"{prefix}{n}.weight"
                fmt = cfg.format_for(name)
                if fmt is None:
                    continue
                qw = quantize_one(state[name], fmt, cfg, hessians.get(lead), name)
                state[name] = qw.dequantize()
                weights[name] = qw.compact()
        for k, v in state.items():
            if k not in weights:
                kept[k] = v
        if xs is not None:
            layer = load_layer(lazy, i, state, cfg.calib_torch_dtype)
            xs = run_layer(layer, xs, pe)
        drop_layer(lazy, i)
        if progress and weights:
            last = weights[f"{prefix}mlp.down_proj.weight"].error
            steps.set_postfix(down_sqnr=f"{last['sqnr_db']:.1f}dB")

    norm = lazy.get("model.norm.weight")
    kept["model.norm.weight"] = norm
    H_head = None
    if xs is not None:
        final = lazy.skeleton.model.norm
        final.to_empty(device="cpu")
        final.load_state_dict({"weight": norm})
        with torch.inference_mode():
            h = final(xs.float()).reshape(-1, config.hidden_size)
        H_head = ((h.T @ h).double() / h.shape[0]).float()
        final.to("meta")
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    fmt = cfg.format_for(head_name)
    if config.tie_word_embeddings:
        H_tied = None if H_head is None else tied_hessian(H_head)
        weights[head_name] = quantize_one(embed, fmt, cfg, H_tied, head_name) if fmt else None
    else:
        e_fmt = cfg.format_for("model.embed_tokens.weight")
        weights["model.embed_tokens.weight"] = rtn(embed, e_fmt) if e_fmt else None
        head = lazy.get("lm_head.weight")
        weights[head_name] = quantize_one(head, fmt, cfg, H_head, head_name) if fmt else None
    for qw in weights.values():
        if qw is not None:
            qw.compact()
    for k in [k for k, v in weights.items() if v is None]:
        kept[k] = embed if k == "model.embed_tokens.weight" else lazy.get(k)
        del weights[k]
    return QuantizedModel(weights, kept, cfg, extra)
