"""Function-preserving channel rescaling of decoder layers (the pairs each family declares, models/families).

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

import torch

from ..errors import UnsupportedArchitectureError
from ..models.families import ScalePair, family_of


def pairs(config) -> tuple[ScalePair, ...]:
    return family_of(config).pairs


def check_rescalable(config) -> None:
    if not pairs(config):
        raise UnsupportedArchitectureError(
            f"channel rescaling (AWQ, off-grid) has no function-preserving pairs for {config.model_type!r}; "
            "use --method gptq or rtn")


def pair_width(pair: ScalePair, config) -> int:
    if pair.gqa:
        return config.num_key_value_heads * _head_dim(config)
    if pair.targets == (family_of(config).down,):
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
        off = family_of(config).norm_offset  # a gain of (off + w): (off + w) / s = off + w'
        src.add_(off).div_(s).sub_(off) if off else src.div_(s)
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
    pair in the family's order: the same draws whether the model is held whole or streamed a layer at a time)."""
    for pair in pairs(config):
        s = torch.exp(torch.randn(pair_width(pair, config), generator=g) * sigma)
        apply_scale(state, layer_prefix(i), pair, s, config)


def offgrid_record(sigma: float, seed: int, config) -> dict:
    return {"transform": "offgrid", "sigma": sigma, "seed": seed, "pairs": [p.name for p in pairs(config)]}


def offgrid(state: dict[str, torch.Tensor], config, sigma: float = 0.1, seed: int = 0) -> dict:
    """Rescale every pair of every layer by exp(N(0, sigma^2)) factors drawn from `seed` (in place).

    Returns what was done, for the record: sigma, seed, and the pairs touched.
    """
    check_rescalable(config)
    g = torch.Generator().manual_seed(seed)
    for i in range(config.num_hidden_layers):
        offgrid_layer(state, i, config, g, sigma)
    return offgrid_record(sigma, seed, config)
