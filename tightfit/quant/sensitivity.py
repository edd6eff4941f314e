"""The mixed-precision proxy, measured layer by layer: memory is one decoder layer plus the windows' activations.

The diagonal Fisher of a full-model backward is a sum over windows of squared per-window gradients. Each
window's gradient flows backwards through the layers one at a time, so the same numbers come from: a forward
pass layer by layer that keeps every layer's input (windows x ctx x hidden, fp32), the head's gradient with
labels sampled from the model's own next-token distribution, then a backward pass from the last layer to the
first that recomputes each layer's forward from its kept input and carries each window's gradient with
respect to the hidden state down to the next. The input Hessians (for the method's error ratios) are taken in
the forward pass, and a layer's ratios are priced while its Hessians exist, so no model-wide set of Hessians
is ever held (a 1.5B model's would take tens of GB). Tied embeddings get both of their uses: the head's
gradient plus, on the rows of the window's tokens, the gradient that reaches the embedding lookup.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FormatError
from ..models.layered import check_layered, drop_layer, final_norm, head_weight, layer_call, load_layer, rotary, \
    run_layer
from .calibrate import quantize_one, tied_hessian
from .config import GPTQ_METHODS, QuantConfig
from .core import fisher_loss, rtn, weight_error
from .gptq import gptq_errors
from .stats import RoutedInputs, gram

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")  # kept in full precision: not items


def expert_hessians(layer, prefix: str, fam, config, routed: RoutedInputs, w: dict) -> dict:
    """{expert tensor name: (E[x x^T] of the fit half, of the test half)}: gate and up on the rows routed to the
    expert, down on act(gate) * up of those rows (w: the layer's expert tensors by name). An expert with no rows
    in a half gets the identity there."""
    import torch.nn.functional as Fn

    from transformers.activations import ACT2FN

    act, moe = ACT2FN[config.hidden_act], fam.moe
    out = {}
    for e in range(moe.n_experts(config)):
        g, u, d = (moe.expert_name(prefix, e, p) for p in ("gate_proj", "up_proj", "down_proj"))
        pair_in, pair_down = [], []
        for half in (0, 1):
            x = routed.inputs(e, half)
            with torch.no_grad():
                a = None if x is None else act(Fn.linear(x, w[g])) * Fn.linear(x, w[u])
            pair_in.append(torch.eye(config.hidden_size) if x is None else gram(x))
            pair_down.append(torch.eye(moe.ffn(config)) if a is None else gram(a))
        out[g] = out[u] = tuple(pair_in)
        out[d] = tuple(pair_down)
    return out


def tensor_ratios(w: torch.Tensor, H: torch.Tensor, H_eval: torch.Tensor, cfg: QuantConfig, formats, name: str,
                  rows: int, g: torch.Generator) -> dict[str, float]:
    """cfg.method's output error over round-to-nearest's, per format, on `rows` sampled rows of w; the method
    fits H and is scored on H_eval (inputs it did not see)."""
    w = w.float()
    w = w[torch.randperm(w.shape[0], generator=g)[:rows]]
    fits = [f for f in formats if f.fits(tuple(w.shape))]
    if cfg.method in GPTQ_METHODS:
        errs = gptq_errors(w, H, fits, act_order=cfg.act_order, damp=cfg.damp, clip_search=cfg.clip_search,
                           H_eval=H_eval)
    else:
        errs = [weight_error(w, quantize_one(w, f, cfg, H, name).dequantize(), H_eval)["output_sq_err"] for f in fits]
    ref = [rtn(w, f, H_eval).error["output_sq_err"] for f in fits]
    return {f.name: e / r if r > 0 else 1.0 for f, e, r in zip(fits, errs, ref)}


def tensor_losses(w: torch.Tensor, F: torch.Tensor, formats, ratios: dict[str, float] | None, name: str):
    """Predicted KL increase 1/2 sum F dW^2 (dW: RTN's error, scaled by the method's ratio) and bytes, per format."""
    w = w.float()
    loss = np.full(len(formats), np.inf)
    nbytes = np.zeros(len(formats), dtype=np.int64)
    for j, fmt in enumerate(formats):
        try:
            fmt.check_shape(tuple(w.shape), name)
        except FormatError:
            continue
        rows = max(1, (1 << 23) // w.shape[1])  # row blocks: a 1.5B embedding is 233M weights
        total = 0.0
        for i in range(0, w.shape[0], rows):
            total += fisher_loss(w[i : i + rows], F[i : i + rows], fmt)
        loss[j] = 0.5 * total * (ratios or {}).get(fmt.name, 1.0)
        nbytes[j] = fmt.nbytes(tuple(w.shape))
    return loss, nbytes, w.numel()


class SplitHessian:
    """E[x x^T] of one linear's inputs, calls alternating between two halves (one window per call), so that an
    error can be fitted on one half and measured on the other. Sums are fp32, accumulated in place (a few
    dozen windows of a few hundred tokens each; fp64 doubled the largest buffers of a layer's working set)."""

    def __init__(self, n: int):
        self.H = (torch.zeros(n, n), torch.zeros(n, n))
        self.tokens = [0, 0]
        self.calls = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        k = self.calls % 2
        self.H[k].addmm_(x.T, x)
        self.tokens[k] += x.shape[0]
        self.calls += 1

    def fit_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(h / max(t, 1) for h, t in zip(self.H, self.tokens))

    def result(self) -> torch.Tensor:
        return (self.H[0] + self.H[1]) / max(sum(self.tokens), 1)


def layerwise_sensitivities(lazy, ids: torch.Tensor, cfg: QuantConfig, formats, progress: bool = False,
                            keep_hessians: bool = False, rows: int = 64):
    """-> (Sensitivity, method_ratios {name: {format: ratio}}, {linear name: E[x x^T]} if keep_hessians else {}).

    ids: [windows, ctx] calibration token ids; the Fisher's labels are sampled with cfg.seed."""
    from ..io import release_freed_memory_eagerly
    from .mixed import Sensitivity

    release_freed_memory_eagerly()
    config = lazy.config
    fam = check_layered(config, "the mixed-precision sensitivities")
    n_win, T = ids.shape
    L, tied = config.num_hidden_layers, config.tie_word_embeddings
    g_rows, g_labels = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    priced = cfg.method != "rtn"
    ratios: dict[str, dict[str, float]] = {}
    hessians: dict[str, torch.Tensor] = {}
    losses: dict[str, tuple] = {}
    bar = tqdm(total=2 * L + 2, desc=f"sensitivity ({cfg.method})", unit="step", disable=not progress)

    from ..models.families import embed_scale_value
    from ..models.layered import embed as embed_rows

    e_scale = embed_scale_value(fam, config)
    embed = lazy.get(EMBED)
    x = embed_rows(lazy, ids, torch.float32, embed)
    if not tied:
        del embed
    pe = rotary(lazy, T)
    inputs = torch.empty(L, *x.shape)  # every layer's input, in one allocation (no heap fragments)
    for i in range(L):  # forward: keep each layer's input, take its input Hessians, price the method
        prefix = f"model.layers.{i}."
        layer = load_layer(lazy, i)  # its parameters are the only copy of the layer's weights
        groups = {g[0]: g for g in fam.layer_groups(config, i)}
        hooks = {lead: SplitHessian(layer.get_submodule(lead).in_features) for lead in groups
                 if priced or keep_hessians}
        handles = [layer.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
        routed = None
        if fam.is_moe_layer(config, i) and (priced or keep_hessians):
            routed = RoutedInputs(fam.moe.n_experts(config), alternate=True, keep_all=False)
            handles.append(layer.mlp.experts.register_forward_pre_hook(routed))
        inputs[i].copy_(x)
        run_layer(layer, inputs[i], pe, batch=1, out=x)  # one window per call: the Hessian halves alternate
        for h in handles:
            h.remove()
        if routed is not None:
            w = {n: t.detach() for n, t in fam.moe.unstack(dict(layer.named_parameters(prefix=prefix[:-1])), prefix,
                                                            config).items()}
            for name, (H_fit, H_test) in expert_hessians(layer, prefix, fam, config, routed, w).items():
                if priced:
                    ratios[name] = tensor_ratios(w[name], H_fit, H_test, cfg, formats, name, rows, g_rows)
                if keep_hessians:
                    hessians[name] = (H_fit + H_test) / 2
            del routed
        for lead, group in groups.items():
            if lead not in hooks:
                continue
            H_fit, H_test = hooks[lead].fit_test()
            for n in group:
                name = f"{prefix}{n}.weight"
                if priced:
                    w = layer.get_submodule(n).weight.detach()
                    ratios[name] = tensor_ratios(w, H_fit, H_test, cfg, formats, name, rows, g_rows)
                if keep_hessians:
                    hessians[name] = hooks[lead].result()
        drop_layer(lazy, i)
        del layer, hooks
        bar.update()

    norm = final_norm(lazy)
    head = head_weight(lazy)
    H_head = SplitHessian(config.hidden_size)
    F_head = torch.zeros_like(head)
    gh = torch.empty_like(head)  # one window's head gradient, reused
    grad = torch.empty_like(x)
    tied_rows = []
    rows_t = torch.arange(T - 1)
    for w in range(n_win):  # the head: per-window gradients with labels sampled from the model itself
        xw = x[w : w + 1].clone().requires_grad_(True)
        h = norm(xw)
        hd = h.detach()[0]
        H_head(None, (hd[None],))
        with torch.no_grad():  # d/dlogits of sum_t log p(y_t) is onehot(y) - softmax: by hand, without autograd's
            p = torch.softmax(hd[:-1] @ head.T, -1)  # copies of the [T, vocab] logits
            y = torch.multinomial(p, 1, generator=g_labels)[:, 0]
            p.neg_()
            p[rows_t, y] += 1
            torch.mm(p.T, hd[:-1], out=gh)
            F_head.addcmul_(gh, gh, value=1 / (T - 1))
            if tied:
                uniq, inv = ids[w].unique(return_inverse=True)
                tied_rows.append((uniq, inv, gh[uniq].clone()))
            gx = torch.zeros_like(hd)
            torch.mm(p, head, out=gx[:-1])
        h.backward(gx[None])
        grad[w] = xw.grad[0]
        del p, h, gx
    del gh
    lazy.skeleton.model.norm.to("meta")
    H_fit, H_test = H_head.fit_test()
    head_item = EMBED if tied else HEAD
    if priced:
        fit_h, test_h = (tied_hessian(H_fit), tied_hessian(H_test)) if tied else (H_fit, H_test)
        ratios[head_item] = tensor_ratios(head, fit_h, test_h, cfg, formats, head_item, rows, g_rows)
    if keep_hessians:
        hessians[HEAD] = H_head.result()
    bar.update()

    for i in reversed(range(L)):  # backward: each layer's Fisher from its kept input and the gradient above it
        prefix = f"model.layers.{i}."
        layer = load_layer(lazy, i)
        params = {f"{prefix}{n}": p for n, p in layer.named_parameters()}
        for p in params.values():
            p.requires_grad_(p.ndim >= 2)  # linears, and transformers' 3-D expert parameters
        params = {n: p for n, p in params.items() if p.ndim >= 2}
        F = {n: torch.zeros_like(p) for n, p in params.items()}
        xs = inputs[i]
        for w in range(n_win):
            xw = xs[w : w + 1].clone().requires_grad_(True)
            with torch.enable_grad():
                out = layer_call(layer, xw, pe)
            for p in params.values():
                p.grad = None
            out.backward(grad[w : w + 1])
            for n, p in params.items():
                F[n].addcmul_(p.grad, p.grad, value=1 / (T - 1))
                p.grad = None
            grad[w] = xw.grad[0]
            del out
        for p in params.values():
            p.grad = None
        if fam.is_moe_layer(config, i):  # one item per expert tensor; the routers stay in full precision
            experts = fam.moe.unstack(F, prefix, config)
            weights = fam.moe.unstack({n: p.detach() for n, p in params.items()}, prefix, config)
            for n in experts:
                losses[n] = tensor_losses(weights[n], experts[n] / n_win, formats, ratios.get(n), n)
            params = {n: p for n, p in params.items() if ".mlp.experts." not in n and not n.endswith(ROUTERS)}
        for n, p in params.items():
            losses[n] = tensor_losses(p.detach(), F.pop(n) / n_win, formats, ratios.get(n), n)
        drop_layer(lazy, i)
        del layer, F, params, xs
        bar.update()

    if e_scale != 1.0:  # x = scale * embedding row: the rows' gradient is scale times x's
        grad.mul_(e_scale)
    if tied:  # the embedding's own gradient lands on the rows of each window's tokens
        F_embed = F_head
        for w, (uniq, inv, gh) in enumerate(tied_rows):
            gi = torch.zeros_like(gh).index_add_(0, inv, grad[w])
            F_embed[uniq] += (2 * gh * gi + gi * gi) / (T - 1)
        losses[EMBED] = tensor_losses(head, F_embed / n_win, formats, ratios.get(EMBED), EMBED)
    else:
        losses[HEAD] = tensor_losses(head, F_head / n_win, formats, ratios.get(HEAD), HEAD)
        del head, F_head
        embed = lazy.get(EMBED)
        F_embed = torch.zeros_like(embed)
        for w in range(n_win):
            uniq, inv = ids[w].unique(return_inverse=True)
            gi = torch.zeros(len(uniq), embed.shape[1]).index_add_(0, inv, grad[w])
            F_embed[uniq] += gi * gi / (T - 1)
        losses[EMBED] = tensor_losses(embed, F_embed / n_win, formats, ratios.get(EMBED), EMBED)
    bar.update()
    bar.close()

    names = [EMBED] + [n for i in range(L) for n in losses if n.startswith(f"model.layers.{i}.")]
    names += [HEAD] if not tied else []
    sens = Sensitivity(names, list(formats), np.stack([losses[n][0] for n in names]),
                       np.stack([losses[n][1] for n in names]), np.array([losses[n][2] for n in names]))
    return sens, ratios, hessians
