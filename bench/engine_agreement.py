"""How often two engines pick the same next token on the same quantized weights (top-1 agreement).

Issue 6 asks that llama.cpp running our GGUF export agree with tightfit's runtime on >= 98% of next-token top-1
predictions. This measures, on the same evaluation windows, every pair among:
  - tightfit's runtime (int8 activations per 32, as llama.cpp's Q8_0/Q8_1 dot products),
  - tightfit's runtime on its torch path (bf16 activations),
  - an fp32 reference (transformers, the artifact's dequantized weights),
  - llama.cpp on the exported GGUF with 512-token micro-batches (its GEMM path) and with 8-token ones,
so the threshold can be read against how well llama.cpp agrees with itself. Exports: RTN sym4-g32 (-> Q4_0),
asym4-g32 (-> Q4_1), sym8-g32 (-> Q8_0), every code copied exactly.
Writes bench/results/engine_agreement.json. Usage: python bench/engine_agreement.py [--chunks 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
WORK = Path.home() / ".cache" / "tightfit" / "bench" / "agreement"


def llama_logits(path: Path, windows, ubatch: int) -> list[torch.Tensor]:
    from llama_cpp import Llama

    from tightfit.eval.llama_cpp import check_build

    check_build()
    llm = Llama(str(path), n_ctx=windows.ctx, n_batch=windows.ctx, n_ubatch=ubatch, logits_all=True, verbose=False)
    try:
        out = []
        for i in range(windows.tokens.shape[0]):
            llm.reset()
            llm.eval(windows.tokens[i].tolist())
            out.append(torch.from_numpy(np.array(llm.scores[windows.first:windows.ctx - 1], dtype=np.float32)))
        return out
    finally:
        llm.close()


def main() -> int:
    import tightfit
    from tightfit.data import EVALUATION, read_part
    from tightfit.eval.perplexity import window_logprobs
    from tightfit.eval.windows import make_windows, tokenize
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig
    from tightfit.runtime import load_runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--formats", nargs="*", default=["sym4-g32", "asym4-g32", "sym8-g32"])
    ap.add_argument("--out", default=str(HERE / "results" / "engine_agreement.json"))
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    text = read_part(EVALUATION)
    rows = []
    for name in args.formats:
        fmt = WeightFormat.parse(name)
        art, gguf_path = WORK / name, WORK / f"{name}.gguf"
        if not art.exists():
            quantize("smollm2-135m", QuantConfig(method="rtn", fmt=fmt), art, force=True)
        report = export_gguf(art, gguf_path, force=True)
        fast = load_runtime(art)
        windows = make_windows(tokenize(fast.tokenizer, text), 512, args.chunks)
        logits = {"runtime int8-act": [window_logprobs(fast.model, windows.tokens[i], windows.first)
                                       for i in range(args.chunks)]}
        del fast
        slow = load_runtime(art, kernel="torch")
        logits["runtime torch bf16"] = [window_logprobs(slow.model, windows.tokens[i], windows.first)
                                        for i in range(args.chunks)]
        del slow
        ref = tightfit.load(art)
        ref.model.float()
        logits["fp32 reference"] = [window_logprobs(ref.model, windows.tokens[i], windows.first)
                                    for i in range(args.chunks)]
        del ref
        for ub in (512, 8):
            logits[f"llama.cpp ubatch {ub}"] = llama_logits(gguf_path, windows, ub)
        top = {k: torch.cat([t.argmax(-1) for t in v]) for k, v in logits.items()}
        pairs = {f"{a} | {b}": float((top[a] == top[b]).float().mean()) for a, b in itertools.combinations(top, 2)}
        row = {"format": name, "gguf_exact": report["exact"], "positions": int(top["fp32 reference"].numel()),
               "top1_agreement": pairs}
        print(json.dumps(row, indent=1), file=sys.stderr)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"chunks": args.chunks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
