"""Function-preserving channel rescaling of Llama/Qwen2 decoder layers.

Where an op's output channel c feeds only the input column c of the next linears, multiplying those columns
by s_c and dividing channel c of the op by s_c leaves the model's function unchanged (in exact arithmetic):
  - RMSNorm gain -> q/k/v input columns;  RMSNorm gain -> gate/up input columns;
  - v_proj rows (and bias) -> o_proj columns, each kv head's rows feeding the columns of every query head that
    shares it (GQA);
  - up_proj rows -> down_proj columns (silu(gate) * up is linear in up).
AWQ searches these scales to protect salient input channels; `offgrid` draws them at random to move weights off
the quantization grid a GGUF source left them on, without changing what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedArchitectureError

RESCALABLE = ("llama", "qwen2")


@dataclass(frozen=True)
class ScalePair:
    name: str
    source: str  # the op whose output channels are divided by s (a norm weight or a linear's rows)
    targets: tuple[str, ...]  # linears whose input columns are multiplied by s
    gqa: bool = False  # v_proj -> o_proj: s is per kv channel, expanded over the query heads sharing it


PAIRS = (
    ScalePair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalePair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), gqa=True),
    ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalePair("mlp_out", "mlp.up_proj", ("mlp.down_proj",)),
)


def check_rescalable(config) -> None:
    if config.model_type not in RESCALABLE:
        raise UnsupportedArchitectureError(
            f"channel rescaling (AWQ, off-grid) handles model types {list(RESCALABLE)}, got {config.model_type!r}")


def pair_width(pair: ScalePair, config) -> int:
    if pair.gqa:
        return config.num_key_value_heads * _head_dim(config)
    if pair.name == "mlp_out":
        return config.intermediate_size
    return config.hidden_size


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def expand_gqa(s: torch.Tensor, config) -> torch.Tensor:
    """Per kv channel [n_kv * hd] -> per o_proj input column [n_heads * hd]."""
    hd = _head_dim(config)
    rep = config.num_attention_heads // config.num_key_value_heads
    return s.reshape(config.num_key_value_heads, 1, hd).expand(-1, rep, -1).reshape(-1)


def apply_scale(state: dict[str, torch.Tensor], prefix: str, pair: ScalePair, s: torch.Tensor, config) -> None:
    """In place on a state dict holding `prefix` + names: source channels / s, target columns * s."""
    s = s.to(torch.float32)
    src = state[f"{prefix}{pair.source}.weight"]
    if src.ndim == 1:
        src.div_(s)
    else:
        src.div_(s[:, None])
        bias = state.get(f"{prefix}{pair.source}.bias")
        if bias is not None:
            bias.div_(s)
    cols = expand_gqa(s, config) if pair.gqa else s
    for t in pair.targets:
        state[f"{prefix}{t}.weight"].mul_(cols[None, :])


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def offgrid_layer(state: dict[str, torch.Tensor], i: int, config, g: torch.Generator, sigma: float) -> None:
    """Layer i's pairs rescaled by exp(N(0, sigma^2)) factors drawn from g, in place (layers in order, each
    pair in PAIRS order: the same draws whether the model is held whole or streamed a layer at a time)."""
    for pair in PAIRS:
        s = torch.exp(torch.randn(pair_width(pair, config), generator=g) * sigma)
        apply_scale(state, layer_prefix(i), pair, s, config)


def offgrid_record(sigma: float, seed: int) -> dict:
    return {"transform": "offgrid", "sigma": sigma, "seed": seed, "pairs": [p.name for p in PAIRS]}


def offgrid(state: dict[str, torch.Tensor], config, sigma: float = 0.1, seed: int = 0) -> dict:
    """Rescale every pair of every layer by exp(N(0, sigma^2)) factors drawn from `seed` (in place).

    Returns what was done, for the record: sigma, seed, and the pairs touched.
    """
    check_rescalable(config)
    g = torch.Generator().manual_seed(seed)
    for i in range(config.num_hidden_layers):
        offgrid_layer(state, i, config, g, sigma)
    return offgrid_record(sigma, seed)
