"""Speed of tightfit's runtime kernel per weight format, at the real Qwen2.5-1.5B's shapes, interleaved.

Each format's runtime linear (the form the engine holds: tightfit's VNNI kernel where it runs) is timed on the same
random activations: decode (1 token) and prefill (64 and 512 tokens), for the MLP's gate_up (17920 x 1536) and
down (1536 x 8960) projections. The formats are timed in turn, round after round, so drift on this shared
machine hits them alike; min and median seconds per call, and each format's ratio of the plain 4-bit kernel's
time (sym4-g32: > 1 is slower). The point: a format that scores well but runs slower is not a win here.

    python bench/kernel_formats.py -o bench/results/kernel_formats.json [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

FORMATS = ("sym4-g32", "asym4-g32", "asym4-k32", "nl4-g32", "nl4-k32", "sym8-g32")
SHAPES = {"gate_up": (17920, 1536), "down": (1536, 8960)}
TOKENS = (1, 64, 512)


def main() -> int:
    from tightfit.formats.weight import WeightFormat
    from tightfit.quant.core import rtn
    from tightfit.runtime.linear import amx, from_quantized

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        lins = {f: from_quantized(rtn(w, WeightFormat.parse(f), report=False), check=False) for f in FORMATS}
        del w
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            reps = max(1, 64 // m)
            times = {f: [] for f in FORMATS}
            for f in FORMATS:  # warm-up: first-call costs out of the way
                lins[f](x)
            for _ in range(args.rounds):
                for f in FORMATS:
                    t = time.perf_counter()
                    for _ in range(reps):
                        lins[f](x)
                    times[f].append((time.perf_counter() - t) / reps)
            ref = statistics.median(times["sym4-g32"])
            for f in FORMATS:
                med = statistics.median(times[f])
                rows.append({"shape": shape_name, "n": n, "k": k, "tokens": m, "format": f, "kind": lins[f].kind,
                             "table": lins[f].lut is not None, "resident_bytes": lins[f].nbytes,
                             "min_s": min(times[f]), "median_s": med, "ratio_to_sym4_g32": round(med / ref, 3)})
                print(f"{shape_name:8s} {m:4d} tok  {f:10s} {lins[f].kind:4s} {med * 1e3:8.3f} ms  "
                      f"x{med / ref:.3f}", flush=True)
    result = {"threads": args.threads, "rounds": args.rounds, "amx_prefill": amx(), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
