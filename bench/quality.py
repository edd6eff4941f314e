"""Bits per weight vs KL divergence: tightfit's quantizers against llama.cpp's types, from the same base.

For each base (the default model as shipped, and an off-grid rescaled copy, both written as F16 GGUF so
llama.cpp quantizes exactly what we quantize), measure with `tightfit eval` on the evaluation part:
  - tightfit: METHOD x BITS x GROUP (uniform; embedding/head at 8 bits like llama.cpp) and mixed targets;
  - llama.cpp: llama-quantize TYPE from the F16 GGUF, with and without an importance matrix from the
    calibration part (llama-imatrix); each labelled by the bits per weight measured from its file.
Writes bench/results/quality-<base>.json and a Pareto plot. Usage:
  python bench/quality.py --base offgrid --chunks 16 --ours gptq:3:32 awq:3:32 --mixed 3.5 --llama Q4_0 Q3_K_M
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import tightfit
from tightfit.data import CALIBRATION, EVALUATION, read_part
from tightfit.eval import evaluate
from tightfit.formats.size import gguf_bits_per_weight
from tightfit.formats.weight import WeightFormat
from tightfit.quant.api import quantize
from tightfit.quant.config import QuantConfig

HERE = Path(__file__).parent
WORK = Path.home() / ".cache" / "tightfit" / "bench"
LLAMA_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS",
               "IQ2_S", "IQ2_XXS"]


def sh(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def make_base(name: str) -> Path:
    path = WORK / f"{name}-f16.gguf"
    if not path.exists():
        import torch

        from tightfit.export.gguf import write_gguf_f16
        from tightfit.quant.equivalence import offgrid

        lm = tightfit.load("smollm2-135m")
        if name == "offgrid":
            with torch.no_grad():
                offgrid(lm.model.state_dict(), lm.config, sigma=0.1, seed=0)
        write_gguf_f16(lm, path)
    return path


def llama_files(bin_dir: Path, base: Path, types: list[str], imatrix: bool, chunks: int) -> list[tuple[str, Path]]:
    out = []
    imat = base.with_suffix(".imatrix.gguf")
    if imatrix and not imat.exists():
        sh([str(bin_dir / "llama-imatrix"), "-m", str(base), "-f", str(CALIBRATION.path), "-c", "512", "--chunks",
            str(chunks), "-o", str(imat), "-t", "2"])
    for t in types:
        path = base.with_name(f"{base.stem}-{t}{'-imat' if imatrix else ''}.gguf")
        if not path.exists():
            try:
                sh([str(bin_dir / "llama-quantize"), *(["--imatrix", str(imat)] if imatrix else []), str(base),
                    str(path), t, "2"])
            except subprocess.CalledProcessError as e:  # e.g. IQ2 types refuse to run without an importance matrix
                print(f"llama-quantize {t}{' +imatrix' if imatrix else ''} refused: {(e.stderr or e.stdout)[-300:]}",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
        out.append((f"llama.cpp {t}{' +imatrix' if imatrix else ''}", path))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", choices=["original", "offgrid"], default="offgrid")
    ap.add_argument("--chunks", type=int, help="evaluation windows (default: all 88)")
    ap.add_argument("--ours", nargs="*", default=[f"{m}:{b}:{g}" for m in ("rtn", "hqq", "gptq", "awq", "awq-gptq")
                                                    for b in (4, 3, 2) for g in (64, 32)],
                    help="METHOD:BITS:GROUP entries")
    ap.add_argument("--mixed", nargs="*", type=float, default=[4.5, 3.5, 2.5], help="mixed-precision targets (bpw)")
    ap.add_argument("--mixed-method", default="awq-gptq")
    ap.add_argument("--llama", nargs="*", default=LLAMA_TYPES)
    ap.add_argument("--imatrix", choices=["both", "only", "none"], default="both",
                    help="llama.cpp types with an importance matrix, without, or both")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sh(["bash", str(HERE / "build_llama_tools.sh")]).strip())
    base_path = make_base(args.base)
    base = tightfit.load(base_path)
    text = read_part(EVALUATION)
    cache: dict = {}
    out_path = Path(args.out or HERE / "results" / f"quality-{args.base}.json")
    prior = json.loads(out_path.read_text()) if out_path.exists() else {}
    rows = prior.get("rows", [])
    notes = {"notes": prior["notes"]} if "notes" in prior else {}
    done = {r["label"] for r in rows}

    def record(label: str, path: Path, bpw: float, seconds: float | None = None, **extra):
        t = time.time()
        r = evaluate(tightfit.load(path), text, text_name="eval", text_sha256=EVALUATION.sha256, chunks=args.chunks,
                     base=base, base_cache=cache)
        row = {"label": label, "bits_per_weight": bpw, "kld_mean": r.kld_mean, "kld_stderr": r.kld_stderr,
               "kld_p99": r.kld_p99, "perplexity": r.perplexity, "base_perplexity": r.base_perplexity,
               "top1_agreement": r.top1_agreement, "chunks": r.chunks, "quantize_seconds": seconds,
               "eval_seconds": time.time() - t, **extra}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"base": args.base, "base_file": str(base_path), **notes, "rows": rows},
                                       indent=1))

    for entry in args.ours:
        method, bits, group = entry.split(":")
        label = f"tightfit {method} {bits}-bit g{group}"
        if label in done:
            continue
        cfg = QuantConfig(method=method, fmt=WeightFormat(int(bits), int(group), False),
                          calib_samples=args.calib_samples)
        out = WORK / f"{args.base}-{method}{bits}g{group}"
        t = time.time()
        m = quantize(base_path, cfg, out, force=True)
        record(label, out, m["bits_per_weight"], time.time() - t)
    measured = None
    for target in args.mixed:
        label = f"tightfit mixed {args.mixed_method} {target} bpw"
        if label in done:
            continue
        from tightfit.quant.mixed import measure, plan_mixed

        t = time.time()
        mcfg = QuantConfig(method=args.mixed_method, calib_samples=args.calib_samples)
        measured = measured or measure(base_path, mcfg, progress=True)  # one sweep serves every target
        cfg = plan_mixed(base_path, mcfg, target, measured=measured)
        out = WORK / f"{args.base}-mixed{target}"
        m = quantize(base_path, cfg, out, force=True)
        record(label, out, m["bits_per_weight"], time.time() - t, predicted_kld=cfg.predicted_kld)
    for imatrix in {"both": (False, True), "only": (True,), "none": (False,)}[args.imatrix]:
        for label, path in llama_files(bin_dir, base_path, args.llama, imatrix, 100):
            if label not in done:
                record(label, path, gguf_bits_per_weight(path))
    table = compare(rows)
    out_path.write_text(json.dumps({"base": args.base, "base_file": str(base_path), **notes, "rows": rows,
                                    "comparison": table}, indent=1))
    plot(rows, out_path.with_suffix(".png"), args.base)
    print(markdown(table))
    return 0


def front(rows, who: str) -> list[tuple[float, float]]:
    """The Pareto front (bits per weight, KLD) of one side: each point beats every smaller one."""
    pts, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["kld_mean"])):
        if r["label"].startswith(who) and r["kld_mean"] < best:
            best = r["kld_mean"]
            pts.append((r["bits_per_weight"], best))
    return pts


def at(pts: list[tuple[float, float]], bpw: float) -> float | None:
    """A front's KLD at bpw, linear in log KLD between its neighbours; None outside its range."""
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= bpw <= x1:
            return y0 if x1 == x0 else math.exp(math.log(y0) + (bpw - x0) / (x1 - x0) * (math.log(y1) - math.log(y0)))
    return pts[0][1] if len(pts) == 1 and pts[0][0] == bpw else None


def compare(rows) -> list[dict]:
    """Every point of either side beside the other side's front at the same bits per weight."""
    ours, theirs = front(rows, "tightfit"), front(rows, "llama.cpp")
    table = []
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        mine = r["label"].startswith("tightfit")
        other = at(theirs if mine else ours, r["bits_per_weight"])
        row = {"label": r["label"], "bits_per_weight": r["bits_per_weight"], "kld": r["kld_mean"],
               "kld_stderr": r["kld_stderr"], "top1": r["top1_agreement"], "perplexity": r["perplexity"],
               "windows": r["chunks"], "other_side_kld": other}
        if other is not None:
            row["ratio_ours_to_llama"] = r["kld_mean"] / other if mine else other / r["kld_mean"]
        # a point of the other side no larger and no worse, even where its front does not reach this size
        beats = [o for o in rows if o["label"].startswith("llama.cpp" if mine else "tightfit")
                 and o["bits_per_weight"] <= r["bits_per_weight"] and o["kld_mean"] <= r["kld_mean"]]
        if beats:
            row["dominated_by"] = min(beats, key=lambda o: o["bits_per_weight"])["label"]
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| point | bpw | KLD +- se | top-1 | ppl | windows | other side at this bpw | ours / llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        other = "no point near" if t["other_side_kld"] is None else f"{t['other_side_kld']:.4g}"
        if "dominated_by" in t:
            other += f" (beaten by {t['dominated_by']})"
        ratio = f"{t['ratio_ours_to_llama']:.2f}x" if "ratio_ours_to_llama" in t else "-"
        lines.append(f"| {t['label']} | {t['bits_per_weight']:.3f} | {t['kld']:.4g} +- {t['kld_stderr']:.2g} | "
                     f"{t['top1']:.3f} | {t['perplexity']:.2f} | {t['windows']} | {other} | {ratio} |")
    return "\n".join(lines)


def plot(rows, path: Path, base: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for who, marker in (("tightfit", "o"), ("llama.cpp", "s")):
        pts = sorted((r["bits_per_weight"], r["kld_mean"], r["label"]) for r in rows if r["label"].startswith(who))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=who)
            for x, y, lab in pts:
                ax.annotate(lab.replace(who, "").strip(), (x, y), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (every stored byte / unique parameters)")
    ax.set_ylabel("KL divergence vs base (nats/token)")
    ax.set_title(f"SmolLM2-135M, {base} base")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
