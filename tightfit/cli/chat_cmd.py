"""tightfit chat MODEL: an interactive conversation (/reset forgets it, /exit or Ctrl-D leaves)."""

from __future__ import annotations

import sys

from .. import chat_template
from ..errors import TightfitError
from .run_cmd import add_sampling, open_model, sampling_params


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="an artifact, a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="most tokens per answer")
    p.add_argument("--system", help="a system message")
    add_sampling(p)


def run(args) -> int:
    from ..runtime import generate

    params = sampling_params(args)
    lm = open_model(args)
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise TightfitError(f"{args.model} has no chat template; use `tightfit run --raw` for plain completion.")
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        text = chat_template.render(tok, history)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        room = lm.model.args.max_ctx - len(ids)
        if room < 1:
            print("[the conversation is longer than the context: /reset]", file=sys.stderr)
            history.pop()
            continue
        answer = []
        for step in generate(lm.model, tok, ids, min(args.max_tokens, room), params):
            answer.append(step.text)
            sys.stdout.write(step.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
