"""The fault matrix: each writing job killed with SIGKILL at spread-out points of its run, then rerun as a user
would. For every kill: when it came (seconds and share of a clean run), what was left beside the output (nothing,
the dead run's hidden partial, fit's stages, or a whole output), whether anything left looked complete but was not,
and what the rerun did (exit status, whether it reused fit's stages, whether the output then loads and the
leftovers are gone).

    python bench/faults.py -o bench/results/faults.json              # tiny random model, 6 kills per job (~5 min)
    python bench/faults.py --model smollm2-135m --kills 4             # the default model
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tightfit.cli"]


def jobs(model: str, art: Path) -> dict[str, tuple[list[str], str]]:
    """job -> (arguments before -o, output name)."""
    return {
        "quantize rtn": (["quantize", model, "--method", "rtn"], "art"),
        "quantize gptq": (["quantize", model, "--method", "gptq", "--calib-samples", "8", "--calib-ctx", "64"], "art"),
        "convert hf": (["convert", model], "hf"),
        "convert gguf-f16": (["convert", model, "--to", "gguf-f16"], "m.gguf"),
        "export gguf": (["export", str(art), "--format", "gguf"], "m.gguf"),
        "export compressed-tensors": (["export", str(art), "--format", "compressed-tensors"], "ct"),
        "fit": (["fit", model, "--hardware", "ddr5-desktop", "--max-memory", "2.6MB", "--context", "256"], "fit"),
    }


def loads(path: Path) -> bool:
    if path.name == "ct":
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    target = path / "artifact" if (path / "report.md").exists() else path
    r = subprocess.run([sys.executable, "-c", "import sys, tightfit; tightfit.load(sys.argv[1])", str(target)],
                       capture_output=True, text=True)
    return r.returncode == 0


def leftovers(work: Path, out_name: str) -> list[str]:
    return sorted(x.name for x in work.iterdir() if x.name != out_name)


def kill_at(cmd: list[str], delay: float, watch: Path | None = None) -> tuple[int, float]:
    """SIGKILL after `delay` seconds, or (with `watch`, a folder) as soon as a hidden partial or stage appears
    in it; (the pid, or -1 if the job had finished, and when the kill came)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < delay and p.poll() is None:
        if watch is not None and any(x.name.startswith(".") for x in watch.iterdir()):
            break
        time.sleep(0.002)
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return (p.pid if killed else -1), time.perf_counter() - t0


def run_job(name: str, args: list[str], out_name: str, kills: int, base: Path) -> dict:
    work = base / name.replace(" ", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / out_name
    cmd = CLI + args + ["-o", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    clean = time.perf_counter() - t0
    if r.returncode != 0:
        return {"job": name, "error": r.stderr[-1500:]}
    rows = []
    for k in range(kills + 1):  # spread over a clean run, then once as soon as the writing starts
        share = (k + 0.5) / kills if k < kills else None
        shutil.rmtree(work)
        work.mkdir()
        pid, at = kill_at(cmd, share * clean) if share is not None else kill_at(cmd, 2 * clean, watch=work)
        whole = out.exists()
        left = leftovers(work, out_name)
        row = {"kill_at_s": round(at, 3), "kill_at_share": round(share, 3) if share else "first partial",
               "finished_before_kill": pid == -1,
               "output_present": whole, "output_loads": loads(out) if whole else None, "left_beside": left,
               "looks_complete_but_is_not": whole and not loads(out)}
        rerun = cmd + (["--force"] if whole else [])
        r = subprocess.run(rerun, capture_output=True, text=True)
        row.update({"rerun_exit": r.returncode, "rerun_reused_stages": "reusing" in (r.stderr + r.stdout),
                    "rerun_output_loads": out.exists() and loads(out),
                    "left_after_rerun": leftovers(work, out_name)})
        rows.append(row)
        print(json.dumps({"job": name, **row}), file=sys.stderr, flush=True)
    bad = [x for x in rows if x["looks_complete_but_is_not"] or x["rerun_exit"] != 0 or not x["rerun_output_loads"]
           or x["left_after_rerun"]]
    return {"job": name, "clean_run_s": round(clean, 2), "kills": rows, "defects": len(bad)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to work on (default: a tiny random Llama built here)")
    ap.add_argument("--kills", type=int, default=6, help="kill points per job, spread over a clean run")
    ap.add_argument("--jobs", default="", help="only jobs whose name contains this")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_tiny

            model = str(build_tiny("llama", base / "tiny"))
        art = base / "source-art"
        subprocess.run(CLI + ["quantize", model, "--method", "rtn", "-o", str(art)], check=True,
                       capture_output=True)
        result = {"model": args.model or "tiny random Llama (tests/conftest.py)", "kills_per_job": args.kills,
                  "jobs": [run_job(name, a, o, args.kills, base / "work")
                           for name, (a, o) in jobs(model, art).items() if args.jobs in name]}
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0 if all(j.get("defects", 1) == 0 for j in result["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
