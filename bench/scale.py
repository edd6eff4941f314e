"""Time and peak memory of every verb at real model shapes (random weights: quality means nothing here, but time
and memory are exact).

Checkpoints (bf16 safetensors, a real config, the default model's tokenizer) are written once, layer by layer,
to a cache folder (default ~/.cache/tightfit/scale). Each verb runs as a subprocess; its peak RSS is sampled
from the process tree every 0.1 s (psutil), and the bytes it wrote are measured from its output.

    python bench/scale.py --shapes smollm2-135m qwen2.5-1.5b --verbs quantize-rtn eval-base sensitivities
Results: bench/results/scale.json (a run keeps the rows of shapes and verbs it did not rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "scale.json"
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0),
}
VERBS = {  # name -> tightfit arguments after the model (OUT: a fresh output path)
    "quantize-rtn": ["quantize", "{model}", "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", "{out}"],
    "quantize-awq-gptq": ["quantize", "{model}", "--method", "awq-gptq", "--bits", "4", "--group-size", "32",
                          "--calib-samples", "64", "-o", "{out}"],
    "sensitivities": ["quantize", "{model}", "--method", "rtn", "--target-bpw", "4.5", "-o", "{out}"],
    "eval-base": ["eval", "{artifact}", "--base", "{model}", "--chunks", "8", "--json"],
    "run": ["run", "{artifact}", "-p", "The state of the union is", "-n", "32", "--ignore-eos"],
    "fit": ["fit", "{model}", "--context", "1024", "-o", "{out}"],
}


def checkpoint(shape: str, cache: Path) -> Path:
    """A random-weight bf16 checkpoint of this shape, written once (one safetensors shard per layer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import tightfit

    folder = cache / shape
    if (folder / "config.json").is_file():
        return folder
    tmp = cache / f".{shape}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = dict(SHAPES[shape])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, max_position_embeddings=32768, torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, list[str]] = {}  # shard key -> tensor names; each shard is made and written on its own
    state = skeleton.state_dict()
    for name in state:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shards.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", []).append(name)
    for i, names in enumerate(shards.values()):  # one shard in memory at a time: a 7B shape is 15 GB in bf16
        tensors = {}
        for name in names:
            shape = state[name].shape
            t = torch.ones(shape) if len(shape) == 1 and "norm" in name else torch.randn(shape, generator=g) * 0.02
            tensors[name] = t.bfloat16()
        save_file(tensors, tmp / f"model-{i:05d}.safetensors", metadata={"format": "pt"})
        del tensors
    config.save_pretrained(tmp)
    tightfit.load("smollm2-135m").tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def tree_rss(proc) -> int:
    """Resident bytes of a process and its descendants right now (anonymous and file-backed pages)."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(cmd: list[str], log: Path) -> dict:
    """Wall time and peak RSS of the process tree, sampled every 0.1 s (ru_maxrss from wait4 gave the same
    1.64 GB for four different verbs: it was not measuring the job)."""
    import psutil

    t0 = time.time()
    peak = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.1)
    status = proc.returncode
    lines = [ln for ln in log.read_text().replace("\r", "\n").splitlines() if ln.strip()]
    return {"seconds": round(time.time() - t0, 1), "peak_rss_gb": round(peak / 1e9, 3),
            "rc": status, "log_tail": log.read_text()[-400:] if status else "",
            "last_line": lines[-1][-300:] if lines else ""}  # fit: its predicted and measured figures


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-1.5b"], choices=list(SHAPES))
    ap.add_argument("--verbs", nargs="+", default=list(VERBS), choices=list(VERBS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tightfit" / "scale")
    args = ap.parse_args()
    from tightfit.models import parameter_count

    results = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    tf = [sys.executable, "-m", "tightfit.cli"]
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        model = checkpoint(shape, args.cache)
        params = parameter_count(model, "hf")
        artifact = work / f"{shape}-quantize-rtn"
        for verb in args.verbs:
            out = work / f"{shape}-{verb}"
            shutil.rmtree(out, ignore_errors=True)
            needs_artifact = "{artifact}" in VERBS[verb]
            if needs_artifact and not (artifact / "manifest.json").is_file():
                run(tf + [a.format(model=model, out=artifact) for a in VERBS["quantize-rtn"]], work / "prep.log")
            cmd = tf + [a.format(model=model, out=out, artifact=artifact) for a in VERBS[verb]]
            print(f"{shape} {verb}: {' '.join(cmd[3:])}", file=sys.stderr)
            row = {"shape": shape, "params": params, "verb": verb, "command": " ".join(["tightfit"] + cmd[3:])}
            row |= run(cmd, work / f"{shape}-{verb}.log")
            row["bytes_written"] = size_of(out)
            print(json.dumps(row), file=sys.stderr)
            results["rows"] = [r for r in results["rows"] if (r["shape"], r["verb"]) != (shape, verb)] + [row]
            OUT.write_text(json.dumps(results, indent=1))
            if out != artifact:
                shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
