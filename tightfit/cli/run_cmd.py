"""tightfit run MODEL -p PROMPT [--max-tokens N] [--temperature T] [--seed S] [--ignore-eos] [--raw]"""

from __future__ import annotations

import sys
import time

from .. import chat_template
from .common import quiet_libraries


def add_sampling(p):
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--kv-format", default="bf16", help="KV cache: bf16 (default), fp32, int8, int4")
    p.add_argument("--max-memory", metavar="SIZE", help="keep at most SIZE of weights resident (e.g. 40MB); "
                   "stream the rest from disk every token")


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="an artifact, a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens (benchmarks)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    add_sampling(p)


def sampling_params(args):
    from ..runtime import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed)


def open_model(args):
    from ..io import parse_size
    from ..runtime import load_runtime

    quiet_libraries(True)
    budget = parse_size(args.max_memory) if args.max_memory else None
    return load_runtime(args.model, args.kv_format, progress=sys.stderr.isatty(), max_memory=budget)


def prompt_ids(tokenizer, text: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        text = chat_template.render(tokenizer, [{"role": "user", "content": text}])
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def run(args) -> int:
    from ..runtime import generate

    params = sampling_params(args)
    lm = open_model(args)
    ids = prompt_ids(lm.tokenizer, args.prompt, args.raw)
    t0 = time.perf_counter()
    t_first, n = None, 0
    for step in generate(lm.model, lm.tokenizer, ids, args.max_tokens, params, args.stop, args.ignore_eos):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(step.text)
        sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    decode = (n - 1) / (t1 - t_first) if n > 1 else float("nan")
    print(f"[{len(ids)} prompt tokens in {t_first - t0:.2f} s ({len(ids) / (t_first - t0):.1f} tok/s); {n} generated, "
          f"{decode:.1f} tok/s]", file=sys.stderr)
    return 0
