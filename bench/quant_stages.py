"""Where a calibrated quantize's time goes, stage by stage, on the first decoder layers of a real shape.

A random-weight checkpoint of the shape (bench/scale.py's SHAPES) cut to --layers decoder layers is written once
to the cache; `calibrate.quantize_model` runs on it under cProfile with text calibration windows (the model's own
windows cost the same whatever the method, and scale.py times them), and each stage's cumulative time is read
from the profile by the function that does it. The embedding and head are timed apart (--head), since they come
once per model, not once per layer.

    python bench/quant_stages.py --shape qwen2.5-1.5b --layers 2 --method awq-gptq --samples 64
Results: bench/results/quant_stages.json (keyed by shape, method and label; a run replaces its own row).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "quant_stages.json"

# stage -> (file suffix, function name, only when called from this function or None) whose cumulative time is
# that stage's; a stage's functions never call another stage's, so the stages add up (what is left is "other")
STAGES = {
    "layer forwards (calibration passes and the quantized pass)": [("models/layered.py", "run_layer", None)],
    "Hessian sums": [("quant/stats.py", "__call__", None)],
    "AWQ scale search": [("quant/awq.py", "awq_layer", None)],
    "GPTQ factor (Cholesky + triangular inverse)": [("quant/gptq.py", "factor", None)],
    "GPTQ column sweep": [("quant/gptq.py", "_sweep_static", None)],
    "clip search of group ranges": [("quant/core.py", "searched_params", None)],
    "guard: RTN candidate": [("quant/core.py", "rtn", "guarded")],
    "error products (guard, reports)": [("quant/calibrate.py", "add", None)],
    "layer reads (materialize, load)": [("models/lazy.py", "materialize", None)],
    "dequantize into the layer": [("quant/core.py", "dequantize", "quantize_model")],
}


def cut_checkpoint(shape: str, layers: int, cache: Path) -> Path:
    """The shape's random checkpoint with only its first `layers` decoder layers (written once)."""
    sys.path.insert(0, str(HERE))
    import scale

    key = f"{shape}-L{layers}"
    scale.SHAPES.setdefault(key, dict(scale.SHAPES[shape], num_hidden_layers=layers))
    return scale.checkpoint(key, cache)


def stage_times(prof: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    out = {}
    for stage, keys in STAGES.items():
        total = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, callers) in stats.items():
            for suffix, fn, caller in keys:
                if not (file.endswith(suffix) and name == fn):
                    continue
                # recursion would count twice: only calls from outside the function (and from `caller`)
                outer = {c: v for c, v in callers.items() if c[2] != fn and (caller is None or c[2] == caller)}
                total += sum(v[3] for v in outer.values()) if outer or caller else ct
        out[stage] = round(total, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--method", default="awq-gptq")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--label", default="now", help="the row's name (e.g. before / after a change)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tightfit" / "scale")
    args = ap.parse_args()

    import torch

    from tightfit.formats.weight import WeightFormat
    from tightfit.models import load_lazy
    from tightfit.quant.api import calibration_ids, calibration_text
    from tightfit.quant.calibrate import quantize_model
    from tightfit.quant.config import QuantConfig

    model = cut_checkpoint(args.shape, args.layers, args.cache)
    lazy = load_lazy(str(model))
    cfg = QuantConfig(method=args.method, fmt=WeightFormat(args.bits, args.group_size, False),
                      calib_samples=args.samples, calib_ctx=args.ctx)
    text, _ = calibration_text(None)
    ids = calibration_ids(lazy.tokenizer, text, args.samples, args.ctx, cfg.seed)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    quantize_model(lazy, cfg, ids, progress=True)
    prof.disable()
    wall = time.perf_counter() - t0
    stages = stage_times(prof)
    # the Hessian hooks run inside the forwards: the forwards' own time is what is left of them
    fwd = "layer forwards (calibration passes and the quantized pass)"
    stages[fwd] = round(stages[fwd] - stages["Hessian sums"], 2)
    # the head step: the cumulative time of everything after the last layer (guarded calls on the head name)
    stats = pstats.Stats(prof).stats
    head = sum(v[3] for (f, _l, n), v in stats.items() if f.endswith("quant/calibrate.py") and n == "head_tensor")
    row = {"shape": args.shape, "layers": args.layers, "method": args.method, "label": args.label,
           "calibration": f"{args.samples} x {args.ctx}", "threads": torch.get_num_threads(),
           "wall_s": round(wall, 1), "head_s": round(head, 1),
           "per_layer_s": round((wall - head) / args.layers, 1),
           "stages_s": stages | {"other": round(wall - sum(stages.values()), 2)}}
    print(json.dumps(row, indent=1))
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    key = (args.shape, args.method, args.label)
    results["rows"] = [r for r in results["rows"] if (r["shape"], r["method"], r["label"]) != key] + [row]
    OUT.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
