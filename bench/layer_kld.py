"""End-to-end truth for the per-layer diagnosis: the KL divergence to the base when ONE decoder layer is
quantized (every other layer kept in full precision), per method, on windows of the evaluation part.

The methods fit their statistics on calibration windows whose inputs come from the full-precision layers
below, as in bench/calib_diagnosis.py; this says which of that bench's layer-level errors predicts the loss.

    python bench/layer_kld.py MODEL --layers 1,14 --fmt asym4-g32 --windows 8 --ctx 512
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tightfit.data import CALIBRATION, EVALUATION, read_part
from tightfit.eval.windows import tokenize
from tightfit.formats.weight import WeightFormat
from tightfit.models import load_lazy
from tightfit.models.layered import drop_layer, final_norm, head_weight, load_layer, rotary, run_layer
from tightfit.models.layered import embed as embed_rows
from tightfit.quant.api import calibration_ids
from tightfit.quant.awq import awq_clip, awq_layer
from tightfit.quant.calibrate import input_groups
from tightfit.quant.stats import HessianHook
from tightfit.quant.config import QuantConfig
from tightfit.quant.core import rtn
from tightfit.quant.gptq import gptq



def lead_of(config) -> dict[str, str]:
    """Each linear of a layer -> the lead of its input group (where its Hessian is measured)."""
    return {n: lead for lead, group in input_groups(config).items() for n in group}


def quantized_state(base, prefix, H, fmt, variant, cfg, config):
    state = copy.deepcopy(base)
    Hs = {k: v.clone() for k, v in H.items()}
    if variant.startswith("awq"):
        awq_layer(state, prefix, Hs, cfg, config, lambda n: fmt)
    for n, lead in lead_of(config).items():
        w = state[prefix + n + ".weight"]
        if variant == "rtn":
            q = rtn(w, fmt)
        elif variant in ("rtn+clip", "awq"):
            q = awq_clip(w, fmt, Hs[lead])
        else:
            q = gptq(w, Hs[lead], fmt, clip_search=not variant.endswith("noclip"))
        state[prefix + n + ".weight"] = q.dequantize()
    return state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", default="1")
    ap.add_argument("--variants", default="rtn,rtn+clip,gptq,gptq-noclip,awq,awq-gptq")
    ap.add_argument("--fmt", default="asym4-g32")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_kld.json"))
    args = ap.parse_args()
    fmt = WeightFormat.parse(args.fmt)
    lazy = load_lazy(args.model)
    cfg = QuantConfig(method="awq-gptq", fmt=fmt)
    dtype = torch.float32
    calib = calibration_ids(lazy.tokenizer, read_part(CALIBRATION), args.calib, args.ctx, seed=1)
    ev = torch.tensor(tokenize(lazy.tokenizer, read_part(EVALUATION)))
    n = min(args.windows, ev.numel() // args.ctx)
    ev = ev[: n * args.ctx].reshape(n, args.ctx)
    embed = lazy.get("model.embed_tokens.weight")
    pe = rotary(lazy, args.ctx, dtype)
    pe16 = rotary(lazy, args.ctx, torch.bfloat16)
    L = lazy.config.num_hidden_layers
    # the base: every layer in full precision; keep each wanted layer's inputs (eval and calibration windows)
    want = sorted(int(x) for x in args.layers.split(","))
    xe, xc = embed_rows(lazy, ev, dtype, embed), embed_rows(lazy, calib, torch.bfloat16, embed)
    inputs = {}
    for i in range(L):
        if i in want:
            inputs[i] = (xe.clone(), xc.clone())
        layer = load_layer(lazy, i, dtype=dtype)
        xe = run_layer(layer, xe, pe)
        if i < max(want):
            xc = run_layer(layer.to(torch.bfloat16), xc, pe16)
        drop_layer(lazy, i)
    norm, head = final_norm(lazy), head_weight(lazy).float()
    with torch.inference_mode():
        base_lp = [F.log_softmax(norm(xe[w]) @ head.T, -1) for w in range(n)]
    rows = []
    for i in want:
        prefix = f"model.layers.{i}."
        base = {k: v.float().clone() for k, v in lazy.materialize(prefix).items()}
        layer = load_layer(lazy, i, {k: v.to(torch.bfloat16) for k, v in base.items()}, torch.bfloat16)
        hooks = {m: HessianHook(layer.get_submodule(m).in_features) for m in input_groups(lazy.config)}
        handles = [layer.get_submodule(m).register_forward_pre_hook(h) for m, h in hooks.items()]
        run_layer(layer, inputs[i][1], pe16)
        for h in handles:
            h.remove()
        H = {m: h.result() for m, h in hooks.items()}
        drop_layer(lazy, i)
        for variant in args.variants.split(","):
            t0 = time.time()
            state = quantized_state(base, prefix, H, fmt, variant, cfg, lazy.config)
            x = inputs[i][0]
            for j in range(i, L):
                layer = load_layer(lazy, j, state if j == i else None, dtype)
                x = run_layer(layer, x, pe)
                drop_layer(lazy, j)
            with torch.inference_mode():
                kld = torch.cat([(base_lp[w].exp() * (base_lp[w] - F.log_softmax(norm(x[w]) @ head.T, -1))).sum(-1)
                                 for w in range(n)])
            row = {"layer": i, "variant": variant, "kld": float(kld.mean()),
                   "kld_se": float(kld.std() / kld.numel() ** 0.5), "seconds": time.time() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps({"model": args.model, "fmt": args.fmt, "windows": n,
                                                  "ctx": args.ctx, "calib": args.calib, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
