"""Mixed precision to a budget: a sensitivity proxy per (tensor, format), and an exact choice of one format per
tensor that minimizes the predicted loss at a target bits per weight.

Proxy: KL(P || P_quant) ~ 1/2 dW^T F dW with F the model's Fisher information (second-order expansion of the
KL divergence around the original). We keep F's diagonal, estimated from gradients of log p(y|x) with y drawn
from the model's own next-token distribution on calibration windows, so the cost is a few backward passes
instead of one full-model evaluation per tensor and format. Each tensor's dW is its round-to-nearest error in
each candidate format, scaled by how much less the plan's method errs than round-to-nearest on that tensor at
that format (`method_ratios`): GPTQ on the default model leaves 0.05-0.5x RTN's output error, least on the
attention projections and at 2 bits, so an RTN-priced plan would spend bits where GPTQ needs them least. The
choice is a multiple-choice knapsack, solved exactly as a MILP (HiGHS via scipy).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import QuantizeError
from ..formats.weight import WeightFormat
from .calibrate import tied_hessian
from .config import QuantConfig
from .sensitivity import SplitHessian, layerwise_sensitivities, tensor_losses, tensor_ratios

# plain group formats, and super-block ones (K-quant-style scales: 0.5 bpw less than g32 at the same codes) where
# a tensor's rows are a multiple of 256
CANDIDATES = tuple(WeightFormat(b, g, sym) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64) for sym in (True, False)) \
    + tuple(WeightFormat(b, 32, False, superblock=True) for b in (2, 3, 4, 5, 6)) + (WeightFormat(6, 32, True, superblock=True),) \
    + tuple(WeightFormat(4, 32, True, superblock=sb, grid="nl") for sb in (False, True))  # IQ4_NL, IQ4_XS


def fisher_diagonal(model, calib: torch.Tensor, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher per 2-D weight, mean over tokens, from per-window gradients with sampled labels."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    try:
        for i in tqdm(range(calib.shape[0]), desc="sensitivity (Fisher)", unit="window", disable=not progress):
            x = calib[i : i + 1]
            logits = model(x).logits[0, :-1].float()
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
            logp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).sum()
            model.zero_grad(set_to_none=True)
            logp.backward()
            for n, p in params.items():
                fisher[n] += p.grad.detach() ** 2 / (x.shape[1] - 1)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
            p.grad = None
    return {n: f / calib.shape[0] for n, f in fisher.items()}


@contextmanager
def input_hessians(model):
    """While active, every nn.Linear accumulates E[x x^T] of its inputs; yields {weight name: SplitHessian}."""
    hooks = {f"{n}.weight": (m, SplitHessian(m.in_features)) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_pre_hook(h) for m, h in hooks.values()]
    try:
        yield {n: h for n, (_, h) in hooks.items()}
    finally:
        for h in handles:
            h.remove()


def held_out_pair(hooks: dict[str, SplitHessian]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """{name: E[x x^T]} of the even windows and of the odd ones."""
    pairs = {n: h.fit_test() for n, h in hooks.items()}
    return tuple({n: p[k] for n, p in pairs.items()} for k in (0, 1))


def method_ratios(model, hessians: dict[str, torch.Tensor], cfg: QuantConfig, formats=CANDIDATES, rows: int = 64,
                  progress: bool = False, held_out: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per tensor and format: the output error tr(dW H dW^T) of cfg.method over that of round-to-nearest.

    The method fits `hessians`; errors are measured on `held_out` (E[x x^T] of other windows) when given. An
    error measured on the very inputs GPTQ fitted flatters it most where the inputs span least: layer 0's
    inputs are the embeddings of the calibration text's tokens, and in-sample GPTQ priced its q/k/o
    projections at 2 bits as nearly free, which the evaluation text (other tokens) did not confirm.
    Measured on `rows` sampled rows (GPTQ, AWQ's clip search and HQQ treat rows independently given H); GPTQ
    runs every format in one stacked sweep (`gptq_errors`). H comes from the unquantized model, so the errors
    that earlier quantized layers pass on are not in it, nor are AWQ's per-channel scales."""
    if cfg.method == "rtn":
        return {}
    tied = model.config.tie_word_embeddings
    state = model.state_dict()
    held_out = held_out or hessians
    if tied and "lm_head.weight" in hessians:
        hessians = {**hessians, "model.embed_tokens.weight": tied_hessian(hessians["lm_head.weight"])}
        held_out = {**held_out, "model.embed_tokens.weight": tied_hessian(held_out["lm_head.weight"])}
    g = torch.Generator().manual_seed(cfg.seed)
    names = [n for n in hessians if n in state and not (tied and n == "lm_head.weight")]
    return {n: tensor_ratios(state[n], hessians[n], held_out[n], cfg, formats, n, rows, g)
            for n in tqdm(names, desc=f"sensitivity ({cfg.method} vs rtn)", unit="tensor", disable=not progress)}


@dataclass
class Sensitivity:
    names: list[str]
    formats: list[WeightFormat]
    loss: np.ndarray  # [tensors, formats]: predicted KL increase (nats/token); inf where the format does not fit
    nbytes: np.ndarray  # [tensors, formats]
    params: np.ndarray  # [tensors]


def sensitivities(model, fisher: dict[str, torch.Tensor], formats=CANDIDATES, progress: bool = False,
                  ratios: dict[str, dict[str, float]] | None = None) -> Sensitivity:
    """ratios: `method_ratios`, scaling each (tensor, format)'s RTN-priced loss to the method's."""
    ratios = ratios or {}
    tied = model.config.tie_word_embeddings
    names = [n for n in fisher if not (tied and n == "lm_head.weight")]
    state = model.state_dict()
    # a tied embedding/head is one parameter: its gradient already holds both uses
    rows = [tensor_losses(state[n], fisher[n], formats, ratios.get(n), n)
            for n in tqdm(names, desc="sensitivity (formats)", unit="tensor", disable=not progress)]
    return Sensitivity(names, list(formats), np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                       np.array([r[2] for r in rows]))


def priced_sensitivities(model, ids: torch.Tensor, cfg: QuantConfig, formats=CANDIDATES, progress: bool = False,
                         keep_hessians: bool = False):
    """The proxy loss of every (tensor, format), priced for cfg.method, measured layer by layer
    (quant/sensitivity.py): Fisher and input Hessians from the windows `ids`, the method's error ratios fitted
    on half of them and scored on the other. `model`: a LazyModel, or a loaded model (LoadedModel).

    -> (Sensitivity, method_ratios, {linear weight name: E[x x^T] over all windows} if keep_hessians else {})."""
    from ..models.lazy import LazyModel, lazy_from_loaded

    lazy = model if isinstance(model, LazyModel) else lazy_from_loaded(model)
    return layerwise_sensitivities(lazy, ids, cfg, formats, progress, keep_hessians)


def choose(sens: Sensitivity, budget_bytes: float) -> tuple[dict[str, WeightFormat], float]:
    """One format per tensor minimizing total predicted loss with total bytes <= budget (exact MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    T, K = sens.loss.shape
    ok = np.isfinite(sens.loss)
    cost = np.where(ok, sens.loss, 0.0).ravel()
    one_each = np.zeros((T, T * K))
    for t in range(T):
        one_each[t, t * K:(t + 1) * K] = 1
    size = sens.nbytes.ravel().astype(float)[None, :]
    upper = ok.ravel().astype(float)  # formats that do not fit the tensor are fixed to 0
    res = milp(cost, constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size, 0, budget_bytes)],
               integrality=np.ones(T * K), bounds=Bounds(0, upper), options={"disp": False})
    if res.status != 0 or res.x is None:
        least = float(np.where(ok, sens.nbytes, np.inf).min(1).sum())
        raise QuantizeError(f"no choice of formats fits {budget_bytes:.0f} bytes (the smallest choice takes {least:.0f}); "
                            "raise the target bits per weight")
    pick = res.x.reshape(T, K).argmax(1)
    return ({n: sens.formats[k] for n, k in zip(sens.names, pick)},
            float(sum(sens.loss[t, k] for t, k in enumerate(pick))))


def budget_for(sens: Sensitivity, target_bpw: float, kept_bytes: int, kept_params: int) -> float:
    """Bytes left for the quantized tensors when the whole model must average target_bpw."""
    total_params = int(sens.params.sum()) + kept_params
    budget = target_bpw * total_params / 8 - kept_bytes
    least_bpw = (np.where(np.isfinite(sens.loss), sens.nbytes, np.inf).min(1).sum() + kept_bytes) * 8 / total_params
    if budget <= 0 or target_bpw < least_bpw:
        raise QuantizeError(f"target {target_bpw} bits per weight is below what any format allows here: the "
                            f"smallest formats give {least_bpw:.3f}. Choose a target of at least {least_bpw:.3f}.")
    return budget


@dataclass
class Measured:
    """Sensitivities of one model plus the bytes/parameters of what stays unquantized (norms, fp32)."""

    sens: Sensitivity
    kept_bytes: int
    kept_params: int
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # method_ratios


def measure(source, cfg: QuantConfig, *, calib: str | None = None, progress: bool = False, fisher_windows: int = 16,
            formats=CANDIDATES) -> Measured:
    """Fisher diagonal (and each linear's input Hessian) on calibration windows, the method's error relative to
    round-to-nearest per tensor and bit width, then the proxy loss of every (tensor, format) pair."""
    from ..models import load_lazy
    from .api import calibration_ids, calibration_text

    lazy = load_lazy(source)
    text, _ = calibration_text(calib)
    ids = calibration_ids(lazy.tokenizer, text, fisher_windows, cfg.calib_ctx, cfg.seed + 1)
    sens, ratios, _ = priced_sensitivities(lazy, ids, cfg, formats, progress)
    kept = [p for p in lazy.skeleton.state_dict().values() if p.ndim != 2]  # shapes only (meta)
    return Measured(sens, sum(p.numel() * 4 for p in kept), sum(p.numel() for p in kept), ratios)  # norms: fp32


def plan_mixed(source, cfg: QuantConfig, target_bpw: float, *, calib: str | None = None, progress: bool = False,
               fisher_windows: int = 16, formats=CANDIDATES, measured: Measured | None = None) -> QuantConfig:
    """The QuantConfig with a per-tensor plan for target_bpw (and the predicted KLD in `predicted_kld`).

    Pass `measured` (from `measure`) to plan several targets from one sensitivity sweep."""
    m = measured or measure(source, cfg, calib=calib, progress=progress, fisher_windows=fisher_windows,
                            formats=formats)
    budget = budget_for(m.sens, target_bpw, m.kept_bytes, m.kept_params)
    plan, predicted = choose(m.sens, budget)
    return replace(cfg, tensor_formats=plan, predicted_kld=predicted)
