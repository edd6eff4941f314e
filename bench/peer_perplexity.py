"""Agreement with llama.cpp's own llama-perplexity binary, on the whole evaluation text at ctx 512.

Measures, for the default model's GGUF and for tightfit's F16 GGUF of it:
  - llama-perplexity's final estimate (binary built by bench/build_llama_tools.sh from the llama-cpp-python sdist),
  - tightfit eval's perplexity on the same file and text,
  - llama.cpp's logits (llama-cpp-python) scored at tightfit's positions, as a second view of the same engine.
Writes bench/results/peer_perplexity.json. Usage: python bench/peer_perplexity.py [--threads 2] [--chunks N]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tightfit
from tightfit.data import EVALUATION, read_part
from tightfit.eval import evaluate, llama_cpp
from tightfit.eval.windows import make_windows, tokenize
from tightfit.export.gguf import write_gguf_f16

HERE = Path(__file__).parent


def llama_perplexity(binary: Path, model: Path, text: Path, ctx: int, threads: int, chunks: int | None) -> dict:
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    n = re.search(r"calculating perplexity over (\d+) chunks", out.stdout + out.stderr)
    return {"perplexity": float(m.group(1)), "stderr": float(m.group(2)), "chunks": int(n.group(1)),
            "seconds": time.time() - t, "command": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int)
    ap.add_argument("--out", default=str(HERE / "results" / "peer_perplexity.json"))
    args = ap.parse_args()
    bin_dir = Path(subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], capture_output=True, text=True,
                                  check=True).stdout.strip())
    text = read_part(EVALUATION)
    lm = tightfit.load("smollm2-135m", progress=True)
    windows = make_windows(tokenize(lm.tokenizer, text), 512, args.chunks)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = write_gguf_f16(lm, Path(tmp) / "smollm2-135m-f16.gguf", progress=True)
        for label, path in (("original_q4_1", lm.path), ("tightfit_f16", f16)):
            model = lm if label == "original_q4_1" else tightfit.load(path, progress=True)
            ours = evaluate(model, text, text_name="eval", text_sha256=EVALUATION.sha256, ctx=512,
                            chunks=args.chunks, progress=True)
            peer_bin = llama_perplexity(bin_dir / "llama-perplexity", path, EVALUATION.path, 512, args.threads,
                                        args.chunks)
            peer_py = llama_cpp.perplexity(path, windows, args.threads)
            rows[label] = {
                "tightfit_perplexity": ours.perplexity, "tightfit_stderr": ours.perplexity_stderr,
                "tokens_scored": ours.tokens_scored, "chunks": ours.chunks,
                "llama_perplexity_binary": peer_bin, "llama_cpp_python_same_windows": peer_py,
                "ratio_vs_binary": ours.perplexity / peer_bin["perplexity"],
                "ratio_vs_llama_cpp_python": ours.perplexity / peer_py,
            }
            print(label, json.dumps(rows[label], indent=1), file=sys.stderr)
    rows["f16_vs_original_in_llama_cpp"] = (rows["tightfit_f16"]["llama_perplexity_binary"]["perplexity"]
                                            / rows["original_q4_1"]["llama_perplexity_binary"]["perplexity"])
    rows["text_sha256"] = EVALUATION.sha256
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
