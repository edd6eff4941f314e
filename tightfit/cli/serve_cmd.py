"""tightfit serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--parallel N]"""

from __future__ import annotations

from .run_cmd import open_model


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="an artifact, a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--name", help="the model id clients ask for (default: MODEL as given)")
    p.add_argument("--ctx", type=int, default=2048, help="context per request: prompt + generated tokens")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="sequences decoded together (continuous batching; each slot holds a KV cache of --ctx)")
    p.add_argument("--max-body", default="16MB", metavar="SIZE", help="largest request body (default 16MB); more get 413")
    p.add_argument("--kv-format", default="bf16", help="KV cache: bf16 (default), fp32, int8, int4")
    p.add_argument("--max-memory", metavar="SIZE", help="keep at most SIZE of weights resident")


def run(args) -> int:
    import uvicorn

    from ..io import parse_size
    from ..runtime.batch import off_main_thread
    from ..server.app import create_app

    lm = off_main_thread(open_model, args)  # no OpenMP team left in the main thread (see off_main_thread)
    app = create_app(lm.model, lm.tokenizer, args.name or args.model, api_key=args.api_key, ctx=args.ctx,
                     max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, parallel=args.parallel,
                     max_body=parse_size(args.max_body))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
