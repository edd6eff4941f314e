"""Merge every bench/results/quality-<base>*.json into one table (markdown) and one Pareto plot per base.
Usage: python bench/plot_quality.py [--base offgrid]"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import plot


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="offgrid")
    args = ap.parse_args()
    rows = {}
    for f in sorted(glob.glob(str(HERE / "results" / f"quality-{args.base}*.json"))):
        for r in json.loads(Path(f).read_text())["rows"]:
            rows.setdefault(r["label"], r)
    rows = sorted(rows.values(), key=lambda r: r["bits_per_weight"])
    plot(rows, HERE / "results" / f"pareto-{args.base}.png", args.base)
    print("| point | bits per weight | KLD mean ± se | top-1 | perplexity |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
              f"{r['top1_agreement']:.3f} | {r['perplexity']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
