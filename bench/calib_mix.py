"""Does a calibration mix with windows the model writes itself (quant/selfgen.py) beat the shipped text alone?

For each calibrated method, quantizes BASE twice (`--calib-generated 0` and the default share) and scores both
against BASE on two held-out texts: the evaluation part (the calibration text's own domain, other years) and a
second text of another domain (by default Python source from this interpreter's standard library, which no
calibration window contains). Each run is a `tightfit` subprocess; results land in bench/results/calib_mix.json.

    python bench/calib_mix.py BASE --methods awq-gptq,gptq --fmt asym4-g32 --samples 32 --ctx 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def code_text(chars: int = 400_000) -> str:
    """Python source of the standard library (deterministic order), as a second evaluation domain."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(root.glob("*.py")):
        t = f.read_text(errors="ignore")
        parts.append(t)
        n += len(t)
        if n >= chars:
            break
    return "\n\n".join(parts)[:chars]


def tf(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tightfit.cli", *args, "--json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--methods", default="awq-gptq,gptq")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="32")
    ap.add_argument("--samples", default="32")
    ap.add_argument("--ctx", default="512")
    ap.add_argument("--share", default="0.25")
    ap.add_argument("--chunks", default="16")
    ap.add_argument("--other-text", help="a text file of another domain (default: Python standard library)")
    ap.add_argument("--out", default=str(RESULTS / "calib_mix.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        other = a.other_text
        if other is None:
            other = f"{tmp}/code.txt"
            Path(other).write_text(code_text())
        for method in a.methods.split(","):
            for share in ("0", a.share):
                art = f"{tmp}/{method}-{share}"
                t = time.time()
                m = tf("quantize", a.base, "--method", method, "--bits", a.bits, "--group-size", a.group_size,
                       "--calib-samples", a.samples, "--calib-ctx", a.ctx, "--calib-generated", share, "-o", art)
                row = {"method": method, "generated_share": float(share), "quantize_s": round(time.time() - t),
                       "calibration": m["calibration"], "rtn_fallbacks": m.get("rtn_fallbacks")}
                for name, text in (("eval_part", None), ("other_domain", other)):
                    e = tf("eval", art, "--base", a.base, "--chunks", a.chunks, *(["--text", text] if text else []))
                    row[name] = {k: e[k] for k in ("kld_mean", "kld_stderr", "top1_agreement", "perplexity",
                                                   "base_perplexity") if k in e}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"base": a.base, "format": f"bits {a.bits} g{a.group_size}",
                                       "calibration": f"{a.samples} x {a.ctx}", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
