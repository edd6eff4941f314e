"""Why a calibrated method loses to RTN: per tensor and per layer, each method's output error on calibration
windows it did not fit, against round-to-nearest's.

Each sampled layer gets its inputs from the unquantized model (so layers are judged independently), a fit set
and a disjoint held-out set of calibration windows (never the evaluation part). Per linear: the output error
tr(D H_hold D^T) of every variant, as a ratio to RTN's; per layer: the relative MSE of the whole layer's output
on the held-out windows with every linear quantized.

    python bench/calib_diagnosis.py MODEL --layers 1,8,16,24,27 --fit 32 --hold 16 --fmt asym4-g32
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tightfit.data import CALIBRATION, read_part
from tightfit.formats.weight import WeightFormat
from tightfit.models import load_lazy
from tightfit.models.layered import drop_layer, embed, load_layer, rotary, run_layer
from tightfit.quant.api import calibration_ids
from tightfit.quant.awq import awq_clip, awq_layer
from tightfit.quant.calibrate import input_groups
from tightfit.quant.stats import HessianHook
from tightfit.quant.config import QuantConfig
from tightfit.quant.core import rtn
from tightfit.quant.equivalence import expand_gqa, pairs
from tightfit.quant.gptq import gptq

def hessians(layer, xs, pe, groups) -> dict[str, torch.Tensor]:
    hooks = {n: HessianHook(layer.get_submodule(n).in_features) for n in groups}
    handles = [layer.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
    out = run_layer(layer, xs, pe)
    for h in handles:
        h.remove()
    return {n: h.result() for n, h in hooks.items()}, out


def variants(fmt):
    g = lambda **kw: (lambda w, H: gptq(w, H, fmt, **kw))  # noqa: E731
    return {
        "rtn": lambda w, H: rtn(w, fmt, None),
        "rtn+clip": lambda w, H: awq_clip(w, fmt, H),
        "gptq": g(),
        "gptq-noclip": g(clip_search=False),
    }


def err(d: torch.Tensor, H: torch.Tensor) -> float:
    return float(((d @ H) * d).double().sum())


def layer_errors(lazy, i, state, xs_hold, pe, y_ref, dtype) -> tuple[float, float]:
    """(MSE of the layer's output over its update's power; mean over tokens of |dy|^2 / |y|^2, which is what
    the next layer's RMSNorm sees: a massive-activation token's error counts relative to its own size)."""
    layer = load_layer(lazy, i, state, dtype)
    y = run_layer(layer, xs_hold, pe).float()
    ref = y_ref.float()
    d = (y - ref) ** 2
    mse = float(d.mean() / (ref - xs_hold.float()).pow(2).mean())
    token = float((d.sum(-1) / ref.pow(2).sum(-1)).mean())
    return mse, token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", default="1,8,16,24,27")
    ap.add_argument("--fit", type=int, default=32)
    ap.add_argument("--hold", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--fmt", default="asym4-g32")
    ap.add_argument("--variants", default="rtn,rtn+clip,gptq,gptq-noclip,awq,awq-gptq,awq-gptq-noclip")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calib_diagnosis.json"))
    args = ap.parse_args()
    fmt = WeightFormat.parse(args.fmt)
    lazy = load_lazy(args.model)
    cfg = QuantConfig(method="awq-gptq", fmt=fmt)
    ids = calibration_ids(lazy.tokenizer, read_part(CALIBRATION), args.fit + args.hold, args.ctx, seed=1)
    dtype = torch.bfloat16
    xs = embed(lazy, ids, dtype)
    groups = input_groups(lazy.config)
    lead_of = {n: lead for lead, group in groups.items() for n in group}
    pe = rotary(lazy, args.ctx, dtype)
    want = {int(x) for x in args.layers.split(",")}
    rows = []
    for i in range(max(want) + 1):
        layer = load_layer(lazy, i, dtype=dtype)
        if i not in want:
            xs = run_layer(layer, xs, pe)
            drop_layer(lazy, i)
            continue
        t0 = time.time()
        H_fit, y_fit = hessians(layer, xs[: args.fit], pe, groups)
        H_hold, y_hold = hessians(layer, xs[args.fit :], pe, groups)
        xs_hold = xs[args.fit :]
        prefix = f"model.layers.{i}."
        base = {k: v.float().clone() for k, v in lazy.materialize(prefix).items()}
        row = {"layer": i, "tensors": {}, "layer_rel_mse": {}, "token_rel_err": {}}
        outs = {}
        chosen = args.variants.split(",")
        for vname, fn in variants(fmt).items():
            if vname not in chosen and vname != "rtn":
                continue
            state = copy.deepcopy(base)
            for n, lead in lead_of.items():
                w = base[prefix + n + ".weight"]
                qw = fn(w, H_fit[lead])
                dq = qw.dequantize()
                state[prefix + n + ".weight"] = dq
                d = w - dq
                row["tensors"].setdefault(n, {})[vname] = {"hold": err(d, H_hold[lead]), "fit": err(d, H_fit[lead])}
            outs[vname] = state
        # AWQ scales (searched on the fit set) then clip / GPTQ, errors in the scaled coordinates of each linear
        for vname, rounding in (("awq", "clip"), ("awq-gptq", "gptq"), ("awq-gptq-noclip", "gptq-noclip")):
            if vname not in chosen:
                continue
            state = copy.deepcopy(base)
            Hf = {k: v.clone() for k, v in H_fit.items()}
            found, _ = awq_layer(state, prefix, Hf, cfg, lazy.config, lambda n: fmt)
            Hh = {k: v.clone() for k, v in H_hold.items()}
            for pair in pairs(lazy.config):
                if pair.name in found:
                    s = found[pair.name]
                    cols = expand_gqa(s, lazy.config) if pair.gqa else s
                    Hh[pair.targets[0]] = Hh[pair.targets[0]] / (cols[:, None] * cols[None, :])
            # a pair's source linear (v_proj, up_proj) had its rows divided by s: its error counts in the
            # original output coordinates, d * s per row (in the scaled ones it looked 2.6x RTN's, an artifact)
            row_scale = {pair.source: found[pair.name] for pair in pairs(lazy.config)
                         if pair.name in found and pair.source.endswith("_proj")}
            for n, lead in lead_of.items():
                w = state[prefix + n + ".weight"]
                qw = awq_clip(w, fmt, Hf[lead]) if rounding == "clip" else \
                    gptq(w, Hf[lead], fmt, clip_search=rounding == "gptq")
                dq = qw.dequantize()
                d = w - dq
                if n in row_scale:
                    d = d * row_scale[n][:, None]
                state[prefix + n + ".weight"] = dq
                row["tensors"][n][vname] = {"hold": err(d, Hh[lead]), "fit": err(d, Hf[lead])}
            outs[vname] = state
        for vname, state in outs.items():
            row["layer_rel_mse"][vname], row["token_rel_err"][vname] = layer_errors(lazy, i, state, xs_hold, pe,
                                                                                    y_hold, dtype)
        row["seconds"] = time.time() - t0
        rows.append(row)
        for metric in ("layer_rel_mse", "token_rel_err"):
            r0 = row[metric]["rtn"]
            print(f"layer {i} ({row['seconds']:.0f} s): {metric} / rtn's: "
                  + ", ".join(f"{k} {v / r0:.3f}" for k, v in row[metric].items()), flush=True)
        for n, r in row["tensors"].items():
            print(f"   {n:18s} hold/rtn: " + ", ".join(f"{k} {v['hold'] / r['rtn']['hold']:.3f}" for k, v in r.items())
                  , flush=True)
        layer = load_layer(lazy, i, {k: v for k, v in base.items()}, dtype)
        xs = torch.cat([y_fit, y_hold])
        drop_layer(lazy, i)
        Path(args.out).write_text(json.dumps({"model": args.model, "fmt": args.fmt, "fit": args.fit,
                                              "hold": args.hold, "ctx": args.ctx, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
