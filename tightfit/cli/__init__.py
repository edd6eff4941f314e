"""`tightfit <verb>`: one module per verb; nothing imports this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import TightfitError

VERBS = {
    "eval": "perplexity, KL divergence and top-1 agreement of a model against a base",
    "convert": "write a model as a Hugging Face folder or an F16 GGUF",
    "models": "list the models this install can find",
    "quantize": "quantize a model (RTN, GPTQ, AWQ, HQQ; uniform or mixed precision) into an artifact",
    "export": "write an artifact as a GGUF file for llama.cpp / ollama",
    "run": "generate text from a prompt with the runtime, streamed to stdout",
    "chat": "talk with a model interactively",
    "serve": "an OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions)",
    "hardware": "list the device catalog",
    "probe": "measure this machine (bandwidth, kernels, fixed costs, disk) for --hardware this",
    "fit": "measure, plan, quantize, evaluate and time a model for this machine; write a report",
    "plan": "choose formats, KV cache and placement for a model on a device and predict memory and speed",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tightfit", description="Fit large language models to small hardware.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    modules = {}
    for verb, help_ in VERBS.items():
        modules[verb] = importlib.import_module(f".{verb}_cmd", __name__)
        modules[verb].add_arguments(sub.add_parser(verb, help=help_, description=help_))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return modules[args.verb].run(args) or 0
    except TightfitError as e:
        print(f"tightfit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tightfit {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
