"""Layer-by-layer quantization: statistics for one decoder layer, quantize it, pass its quantized outputs on.

Weights come from a LazyModel, one layer at a time, so peak memory is about one layer plus the calibration
activations, and a model larger than RAM can be quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..errors import QuantizeError
from ..models.layered import check_layered, drop_layer, embed, load_layer, rotary, run_layer
from ..models.lazy import LazyModel
from .awq import awq_clip, awq_layer
from .config import GPTQ_METHODS, SCALED, QuantConfig
from .core import QuantizedWeight, error_operand, output_error, rel_error, rtn
from .equivalence import check_rescalable
from .gptq import factor as gptq_factor
from .gptq import gptq
from .hqq import hqq
from .stats import HessianHook, RoutedInputs, gram


def input_groups(config) -> dict[str, tuple[str, ...]]:
    """Linears that read the same input share one Hessian, measured at the first of each group (the lead):
    lead -> group, from the model's family."""
    from ..models.families import family_of

    return {g[0]: g for g in family_of(config).groups}


@dataclass
class QuantizedModel:
    """Quantized weights by parameter name, the tensors kept as they were, and what was done."""

    weights: dict[str, QuantizedWeight]
    kept: dict[str, torch.Tensor]  # norms, biases: stored in full precision
    config: QuantConfig
    extra: dict


def quantize_one(w: torch.Tensor, fmt, cfg: QuantConfig, H: torch.Tensor | None, name: str,
                 report: bool = True, factored=None) -> QuantizedWeight:
    """report: the result measures its own error (through H); False where the caller measures it. factored:
    GPTQ's factor of H (gptq.factor), shared by the row blocks of one tensor."""
    fmt.check_shape(tuple(w.shape), name)
    if cfg.method in GPTQ_METHODS and H is not None:
        return gptq(w, H, fmt, act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp,
                    clip_search=cfg.clip_search, report=report, factored=factored)
    if cfg.method == "awq":
        return awq_clip(w, fmt, H, report=report)
    if cfg.method == "hqq":
        return hqq(w, fmt, H, report=report)
    return rtn(w, fmt, H, report=report)


def tied_hessian(H_head: torch.Tensor) -> torch.Tensor:
    """One matrix is both the embedding table and the output head, quantized once: its error is weighed half by
    the head's inputs, half unweighted (each embedding row is read as it is)."""
    return H_head / H_head.diagonal().mean() + torch.eye(H_head.shape[0])


# weights per quantizer call: a tensor with more (a 151936 x 1536 embedding, a 7B down_proj) is quantized in row
# blocks - every method here treats rows independently given H - so its fp32 temporaries stay near 128 MB each
CHUNK_ELEMENTS = 1 << 25
# the embedding and head come last, when the rest of the artifact is held: smaller blocks there (their H, when
# any, is hidden-wide, so more blocks cost little) took ~0.5 GB off a 7B shape's peak
HEAD_CHUNK_ELEMENTS = 1 << 23


class _Parts:
    """One candidate's row blocks (packed), copied into one tensor of all rows as they come (no list of parts
    concatenated at the end: that held a 7B head's 0.6 GB twice), and its error sums over them."""

    def __init__(self, rows: int):
        self.rows, self.done = rows, 0
        self.whole: QuantizedWeight | None = None  # its tensors filled up to row `done`
        self.sums = torch.zeros(5, dtype=torch.float64)  # |d|^2, |w|^2, d H d, w H w, d H_hold d

    def add(self, w: torch.Tensor, qw: QuantizedWeight, H, H_hold, w_err: float = 0.0) -> None:
        """w_err: output_error(w, H), the same for every candidate of this block."""
        d = w - qw.dequantize()
        self.sums[0] += float((d * d).sum(dtype=torch.float64))
        self.sums[1] += float((w * w).sum(dtype=torch.float64))
        if H is not None:
            self.sums[2] += output_error(d, H)
            self.sums[3] += w_err
        if H_hold is not None:
            self.sums[4] += output_error(d, H_hold)
        qw.compact()
        r0, r1 = self.done, self.done + qw.data.shape[0]
        self.done = r1
        if r0 == 0 and r1 == self.rows:
            self.whole = qw
            return
        if r0 == 0:
            def rows_of(t):
                return None if t is None else t.new_empty((self.rows, *t.shape[1:]))
            self.whole = QuantizedWeight(qw.fmt, rows_of(qw.data), rows_of(qw.scales), rows_of(qw.mins),
                                         g_idx=qw.g_idx, in_features=qw.in_features, packed=True)
        whole = self.whole
        whole.data[r0:r1] = qw.data
        whole.scales[r0:r1] = qw.scales
        if qw.mins is not None:
            whole.mins[r0:r1] = qw.mins

    def result(self, in_features: int, with_H: bool) -> QuantizedWeight:
        assert self.done == self.rows, (self.done, self.rows)
        qw = self.whole
        rel = float(self.sums[0] / self.sums[1].clamp_min(1e-30))
        qw.error = rel_error(rel)
        if with_H:
            qw.error |= {"output_sq_err": float(self.sums[2]),
                         "output_rel_err": float(self.sums[2] / self.sums[3].clamp_min(1e-30))}
        return qw


def guarded(w: torch.Tensor, fmt, cfg: QuantConfig, H: torch.Tensor | None, H_hold: torch.Tensor | None,
            name: str, chunk: int | None = None) -> tuple[QuantizedWeight, bool]:
    """cfg.method's tensor (packed), unless round-to-nearest's output error on the held-out windows is smaller:
    then RTN's (a calibrated method must never return a tensor worse than plain rounding). Large tensors go
    through in row blocks. A super-block format on rows that are not a multiple of 256 becomes its plain form
    (fmt.flat(): llama.cpp's K-quants fall back likewise). -> (tensor, fell back to RTN)."""
    fmt = fmt.for_shape(tuple(w.shape))
    fmt.check_shape(tuple(w.shape), name)
    check = H_hold is not None and cfg.method != "rtn"
    method, plain = _Parts(w.shape[0]), _Parts(w.shape[0])
    rows = max(1, (chunk or CHUNK_ELEMENTS) // w.shape[1])
    Hb = None if H is None else error_operand(H)  # the error products' operand, converted once
    Hb_hold = None if H_hold is None else error_operand(H_hold)
    factored = gptq_factor(H, cfg.act_order, cfg.damp) \
        if cfg.method in GPTQ_METHODS and H is not None and rows < w.shape[0] else None
    for i in range(0, w.shape[0], rows):
        wc = w[i : i + rows].float()
        w_err = 0.0 if H is None else output_error(wc, Hb)
        method.add(wc, quantize_one(wc, fmt, cfg, H, name, report=False, factored=factored), Hb, Hb_hold, w_err)
        if check:
            plain.add(wc, rtn(wc, fmt, report=False), Hb, Hb_hold, w_err)
    qw = method.result(w.shape[1], H is not None)
    if not check:
        return qw, False
    held = {"holdout_sq_err": float(method.sums[4]), "holdout_rtn_sq_err": float(plain.sums[4])}
    if method.sums[4] > plain.sums[4]:
        ref = plain.result(w.shape[1], H is not None)
        ref.error |= held | {"fallback": "rtn"}
        return ref, True
    qw.error |= held
    return qw, False


def quantize_experts(state, prefix: str, fam, config, cfg: QuantConfig, routed: RoutedInputs | None, weights: dict,
                     kept: dict, guard: dict) -> None:
    """Each expert of an MoE layer as its own tensors: gate and up fitted on the rows routed to it (their input
    Hessian), down on those rows' activations act(gate) * up through the expert's original weights. An expert
    whose fit rows number fewer than its input width (a singular Hessian) is fitted on every row entering the
    block instead, and recorded. The dequantized weights go back into the layer's 3-D parameters."""
    import torch.nn.functional as F

    from transformers.activations import ACT2FN

    moe = fam.moe
    act = ACT2FN[config.hidden_act]
    views = moe.unstack(state, prefix, config)
    for e in range(moe.n_experts(config)):
        names = [moe.expert_name(prefix, e, p) for p in ("gate_proj", "up_proj", "down_proj")]
        fit = hold = None
        if routed is not None:
            fit, hold = routed.inputs(e, 0), routed.inputs(e, 1)
            n = 0 if fit is None else fit.shape[0]
            if n < config.hidden_size:
                for name in names:
                    guard["expert_fallbacks"][name] = n
                fit, hold = routed.inputs(None, 0), routed.inputs(None, 1)
        gate, up, down = (views[n].float() for n in names)
        acts = [None if x is None else act(F.linear(x, gate)) * F.linear(x, up) for x in (fit, hold)]
        for name, x, a in ((names[0], fit, None), (names[1], fit, None), (names[2], None, acts)):
            H, H_hold = (gram(fit), gram(hold)) if a is None else (gram(a[0]), gram(a[1]))
            fmt = cfg.format_for(name)
            if fmt is None:
                kept[name] = views[name].clone()
                continue
            qw, fell = guarded(views[name], fmt, cfg, H, H_hold, name)
            guard["tensors"] += 1
            if fell:
                guard["rtn_fallbacks"].append(name)
            views[name].copy_(qw.dequantize())
            weights[name] = qw
        del acts, fit, hold


def quantize_model(lazy: LazyModel, cfg: QuantConfig, calib: torch.Tensor | None, progress: bool = False) -> QuantizedModel:
    """calib: [samples, ctx] token ids (needed for gptq/awq; used by rtn/hqq only to report output error)."""
    from ..io import release_freed_memory_eagerly

    release_freed_memory_eagerly()
    config = lazy.config
    fam = check_layered(config, f"quantizing ({cfg.method})")
    if cfg.method in SCALED:
        check_rescalable(config)
    if cfg.needs_calibration and calib is None:
        raise QuantizeError(f"{cfg.method} needs calibration text")
    weights: dict[str, QuantizedWeight] = {}
    kept: dict[str, torch.Tensor] = {}
    extra: dict = {"awq_scales": {}} if cfg.method in SCALED else {}
    # the embedding and the head are read when needed, as stored (bf16: half of fp32), and dropped after use:
    # at a 7B shape each is 2.2 GB in fp32, and holding them through the layers set the quantize's peak
    xs = pe = None
    n_fit = 0
    if calib is not None:
        xs = embed(lazy, calib, cfg.calib_torch_dtype, lazy.get_stored("model.embed_tokens.weight"))
        pe = rotary(lazy, calib.shape[1], xs.dtype)
        n_fit = calib.shape[0] - cfg.held_out_windows(calib.shape[0])
    guard = {"held_out_windows": 0 if xs is None else xs.shape[0] - n_fit, "tensors": 0, "rtn_fallbacks": [],
             "awq_scale_fallbacks": []}
    if fam.moe is not None:
        guard["expert_fallbacks"] = {}  # expert tensor -> its routed fit tokens, where too few to fit on

    steps = tqdm(range(config.num_hidden_layers), desc=f"quantizing ({cfg.method})", unit="layer",
                 disable=not progress)
    for i in steps:
        prefix = f"model.layers.{i}."
        state = lazy.materialize(prefix)
        groups = {g[0]: g for g in fam.layer_groups(config, i)}
        moe_layer = fam.is_moe_layer(config, i)
        hessians, held, routed = {}, {}, None
        if xs is not None:
            layer = load_layer(lazy, i, state, cfg.calib_torch_dtype)
            hooks = {n: HessianHook(layer.get_submodule(n).in_features) for n in groups}
            handles = [layer.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
            if moe_layer:
                routed = RoutedInputs(fam.moe.n_experts(config))
                handles.append(layer.mlp.experts.register_forward_pre_hook(routed))
            run_layer(layer, xs[:n_fit], pe)
            for h in [*hooks.values(), *([routed] if routed else [])]:
                h.part = 1
            run_layer(layer, xs[n_fit:], pe)
            for h in handles:
                h.remove()
            hessians = {n: h.result(0) for n, h in hooks.items()}
            held = {n: h.result(1) for n, h in hooks.items() if h.tokens[1]}
            del hooks
        if cfg.method in SCALED:
            found, fell_back = awq_layer(state, prefix, hessians, cfg, config,
                                         lambda n: cfg.format_for(prefix + n + ".weight"), held=held or None)
            extra["awq_scales"][i] = found
            guard["awq_scale_fallbacks"] += [f"{prefix}{p}" for p in fell_back]
        for lead, group in groups.items():
            for n in group:
                name = f"{prefix}{n}.weight"
                fmt = cfg.format_for(name)
                if fmt is None:
                    continue
                qw, fell = guarded(state[name], fmt, cfg, hessians.get(lead), held.get(lead), name)
                guard["tensors"] += 1
                if fell:
                    guard["rtn_fallbacks"].append(name)
                if xs is not None:  # the next layer's inputs come through the quantized weights
                    state[name] = qw.dequantize()
                weights[name] = qw
        del hessians, held
        if moe_layer:
            quantize_experts(state, prefix, fam, config, cfg, routed, weights, kept, guard)
            del routed
        for k, v in state.items():
            if k not in weights and not k.startswith(f"{prefix}mlp.experts."):
                kept[k] = v
        if xs is not None:
            layer = load_layer(lazy, i, state, cfg.calib_torch_dtype)
            xs = run_layer(layer, xs, pe, out=xs)
        drop_layer(lazy, i)
        if progress and weights:
            last = weights[next(n for n in reversed(weights) if n.startswith(prefix))].error
            steps.set_postfix(down_sqnr=f"{last['sqnr_db']:.1f}dB", rtn_fallbacks=len(guard["rtn_fallbacks"]))

    norm = lazy.get("model.norm.weight")
    kept["model.norm.weight"] = norm
    H_head = H_head_hold = None
    if xs is not None:
        final = lazy.skeleton.model.norm
        final.to_empty(device="cpu")
        final.load_state_dict({"weight": norm})
        with torch.inference_mode():
            h = final(xs.float())
        final.to("meta")
        fit, hold = h[:n_fit].reshape(-1, config.hidden_size), h[n_fit:].reshape(-1, config.hidden_size)
        H_head = (fit.T @ fit) / fit.shape[0]
        H_head_hold = (hold.T @ hold) / hold.shape[0] if hold.shape[0] else None
        del h, fit, hold
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    fmt = cfg.head_format(config.tie_word_embeddings)

    def head_tensor(w, fmt, H, H_hold):
        if fmt is None:
            return None
        qw, fell = guarded(w, fmt, cfg, H, H_hold, head_name, chunk=HEAD_CHUNK_ELEMENTS)
        guard["tensors"] += 1
        if fell:
            guard["rtn_fallbacks"].append(head_name)
        return qw

    if config.tie_word_embeddings:
        tie = (lambda H: None if H is None else tied_hessian(H))
        weights[head_name] = head_tensor(lazy.get_stored(head_name), fmt, tie(H_head), tie(H_head_hold))
    else:
        e_fmt = cfg.format_for("model.embed_tokens.weight")
        weights["model.embed_tokens.weight"] = guarded(lazy.get_stored("model.embed_tokens.weight"), e_fmt,
                                                       replace(cfg, method="rtn"), None, None,
                                                       "model.embed_tokens.weight", chunk=HEAD_CHUNK_ELEMENTS)[0] \
            if e_fmt else None
        weights[head_name] = head_tensor(lazy.get_stored("lm_head.weight"), fmt, H_head, H_head_hold)
    if fam.moe is not None:
        extra["experts"] = {"fallbacks": guard.pop("expert_fallbacks"), "min_tokens": "the expert's input width",
                            "fallback": "fitted on every token entering the layer's MoE block"}
    if guard["held_out_windows"] and cfg.method != "rtn":
        extra["guard"] = guard | {"rtn_fallback_rate": len(guard["rtn_fallbacks"]) / max(guard["tensors"], 1)}
    for qw in weights.values():
        if qw is not None:
            qw.compact()
    for k in [k for k, v in weights.items() if v is None]:
        kept[k] = lazy.get(k)
        del weights[k]
    return QuantizedModel(weights, kept, cfg, extra)
