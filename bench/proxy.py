"""Validate the mixed-precision sensitivity proxy against the true KL divergence it predicts.

For ~20 (tensor, format) pairs spread over layers, tensor kinds and bit widths: quantize that one tensor
with --method (round to nearest by default; gptq from the same windows' input Hessian) in an otherwise
unchanged model and measure KL(base || model) on evaluation windows; compare with the proxy's
1/2 dW^T diag(F) dW, dW RTN's error, times the method's output error over RTN's for gptq/hqq
(quant/mixed.method_ratios). Reports Spearman rank correlation (goal >= 0.8) and the predicted/measured
ratio. Writes bench/results/proxy-<base>[-<method>].json.
Usage: python bench/proxy.py [--base offgrid] [--method rtn|gptq|hqq] [--pairs 20] [--chunks 4]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

import tightfit
from tightfit.data import CALIBRATION, EVALUATION, read_part
from tightfit.eval import evaluate
from tightfit.quant.api import calibration_ids
from tightfit.quant.calibrate import quantize_one
from tightfit.quant.config import QuantConfig
from tightfit.quant.mixed import priced_sensitivities

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import make_base


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", choices=["original", "offgrid"], default="offgrid")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--method", choices=["rtn", "gptq", "hqq"], default="rtn")
    args = ap.parse_args()
    path = make_base(args.base)
    base, lm = tightfit.load(path), tightfit.load(path)
    ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), args.fisher_windows, 512, seed=1)
    cfg = QuantConfig(method=args.method)
    sens, _, H = priced_sensitivities(lm.model, ids, cfg, progress=True)
    rng = random.Random(0)
    fmt_names = ["asym2-g64", "asym3-g32", "asym4-g32", "sym2-g32", "asym3-g64"]
    cols = [i for i, f in enumerate(sens.formats) if f.name in fmt_names]
    # the tied embedding has no single input Hessian: methods that need one are checked on the linears
    items = range(len(sens.names)) if args.method == "rtn" else [t for t, n in enumerate(sens.names) if n in H]
    pairs = [(rng.choice(items), rng.choice(cols)) for _ in range(args.pairs)]
    text, cache, rows = read_part(EVALUATION), {}, []
    state = lm.model.state_dict()
    for t, k in pairs:
        name, fmt = sens.names[t], sens.formats[k]
        original = state[name].clone()
        with torch.no_grad():
            state[name].copy_(quantize_one(original, fmt, cfg, H.get(name), name).dequantize())
        r = evaluate(lm, text, text_name="eval", text_sha256=EVALUATION.sha256, chunks=args.chunks, base=base,
                     base_cache=cache)
        with torch.no_grad():
            state[name].copy_(original)
        rows.append({"tensor": name, "format": fmt.name, "predicted_kld": float(sens.loss[t, k]),
                     "measured_kld": r.kld_mean, "measured_stderr": r.kld_stderr})
        print(json.dumps(rows[-1]), file=sys.stderr)
    rho = spearmanr([r["predicted_kld"] for r in rows], [r["measured_kld"] for r in rows]).statistic
    ratios = sorted(r["predicted_kld"] / max(r["measured_kld"], 1e-12) for r in rows)
    out = {"base": args.base, "method": args.method, "spearman": float(rho), "pairs": rows, "chunks": args.chunks,
           "predicted_over_measured_median": ratios[len(ratios) // 2]}
    dest = HERE / "results" / f"proxy-{args.base}{'' if args.method == 'rtn' else '-' + args.method}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "pairs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
