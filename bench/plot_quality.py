"""Merge every bench/results/quality-<base>*.json into one table (markdown; each point beside the other side's
front at the same bits per weight) and one Pareto plot per base. Where a point was measured more than once, the
run over the most evaluation windows wins. Usage: python bench/plot_quality.py [--base offgrid]"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import compare, markdown, plot


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="offgrid")
    args = ap.parse_args()
    rows = {}
    for f in sorted(glob.glob(str(HERE / "results" / f"quality-{args.base}*.json"))):
        for r in json.loads(Path(f).read_text())["rows"]:
            if r["label"] not in rows or r["chunks"] > rows[r["label"]]["chunks"]:
                rows[r["label"]] = r
    rows = sorted(rows.values(), key=lambda r: r["bits_per_weight"])
    plot(rows, HERE / "results" / f"pareto-{args.base}.png", args.base)
    print(markdown(compare(rows)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
