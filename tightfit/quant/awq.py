"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, searched to protect the channels that
carry large activations, then a per-group clipping search; both judged by the layer's output error.

The output error of a quantized linear over the calibration tokens is tr(D H D^T) with D = W - Q(W) and
H = E[x x^T]; we search with it directly instead of re-running the layer. Scales are folded into the op that
feeds the linears (equivalence.py), so the artifact holds plain weights that any GGML type or kernel can take.
"""

from __future__ import annotations

import torch

from .core import (
    QuantizedWeight,
    dequantize_codes,
    diagonal_blocks,
    error_operand,
    grouped,
    minmax_params,
    output_error,
    pack_result,
    quantize_codes,
    searched_params,
)
from ..models.families import family_of
from .equivalence import apply_scale, expand_gqa
ALPHAS = torch.linspace(0, 1, 21).tolist()


def fake_quant(w: torch.Tensor, fmt, clip=1.0) -> torch.Tensor:
    wg = grouped(w, fmt)
    scale, mn = minmax_params(wg, fmt, clip)
    return dequantize_codes(quantize_codes(wg, fmt, scale, mn), scale, mn, fmt).reshape(w.shape)


def sample_rows(w: torch.Tensor, in_features: int, g: torch.Generator, flops: float = 1e10):
    """(row indices or None for all, weight of each sampled row): enough rows that the search's d @ H products
    stay near `flops` per candidate. Rows quantize independently, so a row sample estimates the output error
    without bias; at 1.5B shapes the full products (down_proj: 1536 x 8960^2 per alpha) were most of a layer's
    time."""
    n = int(min(w.shape[0], max(64, flops / in_features**2)))
    if n >= w.shape[0]:
        return None, 1.0
    return torch.randperm(w.shape[0], generator=g)[:n], w.shape[0] / n


def source_input(pair, config) -> str | None:
    """The lead of the input group of a pair's source when the source is a linear (v_proj, up_proj): its input
    Hessian. None for a norm."""
    fam = family_of(config)
    return fam.lead_of(pair.source) if pair.source in fam.linears else None


class SourceTerm:
    """The error a scale adds to a pair's SOURCE linear (v_proj, up_proj: its rows are divided by s before it is
    quantized), priced at the targets' output so it adds to their error: channel c's output error
    s_c^2 (D H_src D^T)_cc reaches the target through its columns fed by c (squared norm summed) times the
    gain between them (1 for v -> o, where attention averages values; E[silu(gate_c)^2] for up -> down,
    estimated as E[(silu(gate) * up)_c^2] / E[up_c^2]). Without it the search saw only the targets and made
    the source worse: on a 1.5B Qwen2 layer, v_proj's held-out error rose to 2.6x RTN's."""

    def __init__(self, w: torch.Tensor, fmt, H: torch.Tensor, weight: torch.Tensor, g: torch.Generator):
        self.fmt = fmt
        idx, self.k = sample_rows(w, H.shape[0], g)
        self.rows = slice(None) if idx is None else idx
        self.w, self.weight, self.H = w.float()[self.rows], weight[self.rows], error_operand(H)

    def error(self, s: torch.Tensor, H: torch.Tensor | None = None) -> float:
        """H (an error_operand; default the fitted windows'): the Hessian to price the source's error with."""
        sc = s[self.rows][:, None]
        ws = self.w / sc
        d = (ws - fake_quant(ws, self.fmt)) * sc  # the source's output error in the original coordinates
        H = self.H if H is None else H
        per_channel = ((d.to(H.dtype) @ H).float() * d).sum(1)  # in error_operand's dtype, as core.output_error
        return self.k * float((self.weight * per_channel).sum())


def search_scale(ws: list[torch.Tensor], fmts, H: torch.Tensor, act: torch.Tensor, expand=lambda s: s,
                 seed: int = 0, H_hold: torch.Tensor | None = None, source: SourceTerm | None = None,
                 source_hold: torch.Tensor | None = None):
    """The per-channel scale s = act^alpha (normalized) whose quantized output error is least; alpha=0 is s=1.

    With H_hold (inputs the search did not fit) the found scale must also beat s=1 there, else s=1 is returned.
    source: the pair's source linear, whose error the scale also changes. -> (s, fell back to s=1)."""
    g = torch.Generator().manual_seed(seed)
    H = error_operand(H)  # the error products' operand (core.output_error), converted once
    H_hold = None if H_hold is None else error_operand(H_hold)
    source_hold = None if source_hold is None else error_operand(source_hold)
    sampled = []
    for w in ws:
        idx, k = sample_rows(w, H.shape[0], g)
        sampled.append((w if idx is None else w[idx], k))

    def error(s, H, H_src=None):
        cols = expand(s)
        err = sum(k * output_error(w - fake_quant(w * cols, f) / cols, H) for (w, k), f in zip(sampled, fmts))
        return err + (source.error(s, H_src) if source is not None else 0.0)

    def scale(alpha):
        s = act.clamp_min(1e-5).pow(alpha)
        return s / (s.max() * s.min()).sqrt()

    # AWQ's grid of 21 alphas, searched coarse to fine: every other point, then the two beside the best of
    # those (13 evaluations, the same answer wherever the error is unimodal over the grid)
    tried = {k: error(scale(ALPHAS[k]), H) for k in range(0, len(ALPHAS), 2)}
    k0 = min(tried, key=lambda k: (tried[k], k))
    for k in (k0 - 1, k0 + 1):
        if 0 <= k < len(ALPHAS):
            tried[k] = error(scale(ALPHAS[k]), H)
    k_best = min(tried, key=lambda k: (tried[k], k))
    best_s = scale(ALPHAS[k_best])
    ones = torch.ones_like(act)
    if H_hold is not None and not torch.equal(best_s, ones) and \
            error(best_s, H_hold, source_hold) > error(ones, H_hold, source_hold):
        return ones, True
    return best_s, False


def source_term(state: dict, prefix: str, pair, hessians: dict, config, fmt, seed: int) -> SourceTerm | None:
    w = state[f"{prefix}{pair.source}.weight"]
    if w.ndim != 2 or fmt is None:
        return None
    fmt = fmt.for_shape(tuple(w.shape))
    H_src = hessians[source_input(pair, config)]
    cols = sum((state[f"{prefix}{t}.weight"].float() ** 2).sum(0) for t in pair.targets)  # per target column
    if pair.gqa:  # kv channel c feeds the same column of every query head sharing it
        hd = cols.shape[0] // config.num_attention_heads
        rep = config.num_attention_heads // config.num_key_value_heads
        cols = cols.reshape(config.num_key_value_heads, rep, hd).sum(1).reshape(-1)
        gain = torch.ones_like(cols)
    else:  # up -> down: E[a_c^2] (down_proj's input) over E[up_c^2]
        wf = w.float()
        up_sq = ((wf @ H_src) * wf).sum(1)
        gain = (torch.diagonal(hessians[pair.targets[0]]) / up_sq.clamp_min(1e-12)).clamp(0, 1e4)
    return SourceTerm(w, fmt, H_src, gain * cols, torch.Generator().manual_seed(seed + 1))


def awq_layer(state: dict, prefix: str, hessians: dict, cfg, config, fmt_for,
              held: dict | None = None) -> tuple[dict, list[str]]:
    """Search and fold the scale pairs of one decoder layer (its family's) (state, hessians and held change in place).

    held: the held-out windows' Hessians, by the same names; a pair whose searched scale does not beat s=1 on
    them is left unscaled. -> (scale per pair, the pairs left unscaled by that check)."""
    found, fell_back = {}, []
    for pair in family_of(config).pairs:
        lead = pair.targets[0]  # the targets are one input group, lead first
        H = hessians[lead]
        fmts = [fmt_for(t) for t in pair.targets]
        if any(f is None for f in fmts):
            continue
        ws = [state[f"{prefix}{t}.weight"] for t in pair.targets]
        fmts = [f.for_shape(tuple(w.shape)) for f, w in zip(fmts, ws)]
        act = torch.diagonal(H).clamp_min(0).sqrt()  # RMS activation per input column
        expand = (lambda s: expand_gqa(s, config)) if pair.gqa else (lambda s: s)
        if pair.gqa:  # one scale per kv channel: average over the query heads that share it
            hd = act.shape[0] // config.num_attention_heads
            rep = config.num_attention_heads // config.num_key_value_heads
            act = act.reshape(config.num_key_value_heads, rep, hd).mean(1).reshape(-1)
        H_hold = None if held is None else held.get(lead)
        src_lead = source_input(pair, config)
        src = source_term(state, prefix, pair, hessians, config, fmt_for(pair.source), cfg.seed) \
            if src_lead is not None else None
        src_hold = None if src is None or held is None else held.get(src_lead)
        s, fell = search_scale(ws, fmts, H, act, expand, cfg.seed, H_hold, src, src_hold)
        if fell:
            fell_back.append(pair.name)
        apply_scale(state, prefix, pair, s, config)
        cols = expand(s)
        outer = cols[:, None] * cols[None, :]
        hessians[lead] = H / outer
        if H_hold is not None:
            held[lead] = H_hold / outer
        found[pair.name] = s
    return found, fell_back


def awq_clip(w: torch.Tensor, fmt, H: torch.Tensor | None, report: bool = True) -> QuantizedWeight:
    """Round to nearest with each (row, group) clipped to the range ratio that least hurts the output."""
    w = w.float()
    fmt.check_shape(tuple(w.shape))
    wg = grouped(w, fmt)
    if H is None:
        scale, mn = minmax_params(wg, fmt)
    else:
        scale, mn = searched_params(wg, fmt, diagonal_blocks(H.float(), wg.shape[2]))
    return pack_result(fmt, quantize_codes(wg, fmt, scale, mn), scale, mn, w, H, report)
