"""tightfit's kernel (whichever build this CPU takes: AVX-512 VNNI or the AVX2 form) against torch's int4 op, per
format, shape and token count: weights streamed from three copies round robin, median of --repeats calls.

Each engine runs in its own subprocess (TIGHTFIT_KERNEL=torch selects torch's op; the library choice is made once
per process), the two alternating round after round.

    python bench/kernel_vs_torch.py --rounds 3 -o bench/results/kernel_vs_torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch
from tightfit.formats.weight import WeightFormat
from tightfit.quant.core import rtn
from tightfit.runtime.linear import from_quantized
out = []
for fmt in ("sym4-g32", "asym4-g32", "sym8-g32"):
    f = WeightFormat.parse(fmt)
    for n, k in ((4096, 4096), (1536, 8960)):
        ws = [from_quantized(rtn(torch.randn(n, k) * 0.02, f), check=False) for _ in range(3)]
        for m in (1, 4, 64):
            x = torch.randn(m, k)
            for w in ws:
                w(x)
            times = []
            for _ in range(%d):
                t = time.perf_counter()
                for w in ws:
                    w(x)
                times.append((time.perf_counter() - t) / 3)
            out.append({"format": fmt, "bits": f.bits, "n": n, "k": k, "tokens": m, "kind": ws[0].kind, "s": times})
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "results" / "kernel_vs_torch.json")
    args = ap.parse_args()
    from tightfit.runtime.kernels import kernel_build

    runs: dict[str, list] = {"tightfit": [], "torch": []}
    for _ in range(args.rounds):
        for engine in runs:
            env = {**os.environ, **({"TIGHTFIT_KERNEL": "torch"} if engine == "torch" else {})}
            r = subprocess.run([sys.executable, "-c", CHILD % args.repeats], env=env, capture_output=True, text=True,
                               check=True)
            runs[engine].append(json.loads(r.stdout))
    rows = []
    for i, row in enumerate(runs["tightfit"][0]):
        res = {k: row[k] for k in ("format", "n", "k", "tokens")}
        for engine, rounds in runs.items():
            ts = [t for rnd in rounds for t in rnd[i]["s"]]
            res[engine] = {"kind": rounds[0][i]["kind"], "min_ms": round(min(ts) * 1e3, 3),
                           "median_ms": round(statistics.median(ts) * 1e3, 3),
                           "gb_s": round(row["n"] * row["k"] * row["bits"] / 8 / statistics.median(ts) / 1e9, 2)}
        res["speedup_median"] = round(res["torch"]["median_ms"] / res["tightfit"]["median_ms"], 2)
        rows.append(res)
        print(json.dumps(res))
    args.out.write_text(json.dumps({"kernel": kernel_build(), "threads": os.cpu_count(),
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
