"""tightfit eval MODEL [--base BASE] [--text FILE] [--ctx 512] [--chunks N] [--json]"""

from __future__ import annotations

import json
import sys

from .common import quiet_libraries, read_text_arg


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("--base", metavar="BASE", help="the original model to compare against (KL divergence, top-1)")
    p.add_argument("--text", metavar="FILE", help="text to score (default: the shipped evaluation part)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--chunks", type=int, help="score at most this many windows (default: all)")
    p.add_argument("--kv-format", help="run MODEL on the runtime with this KV cache (bf16, fp32, int8, int4); "
                   "artifacts always run on the runtime (bf16 KV unless given)")
    p.add_argument("--json", action="store_true", help="print one JSON object; no progress bars")


def load_for_eval(source: str, kv_format: str | None, progress: bool):
    """An artifact, or any model with --kv-format, is scored by what the runtime runs; others by transformers."""
    from ..models import load, resolve_source
    from ..runtime import load_runtime

    path, kind = resolve_source(source)
    if kv_format is None and kind != "artifact":
        from ..eval.reference import load_reference

        return load_reference(source, progress=progress)  # fp32, layer by layer where the family allows
    return load_runtime(source, kv_format or "bf16", progress=progress)


def run(args) -> int:
    from ..eval import evaluate
    from ..eval.reference import load_reference

    quiet_libraries(True)
    progress = not args.json
    text, text_name, digest = read_text_arg(args.text)
    model = load_for_eval(args.model, args.kv_format, progress)
    base = load_reference(args.base, progress=progress) if args.base else None
    r = evaluate(model, text, text_name=text_name, text_sha256=digest, ctx=args.ctx, chunks=args.chunks,
                 base=base, progress=progress)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    out = sys.stdout
    size = f" ({r.extra['method']}, {r.extra['bits_per_weight']:.3f} bits per weight)" if "method" in r.extra else ""
    if r.extra.get("runner") == "runtime":
        size += f" [runtime, {r.extra['kv_format']} KV cache]"
    print(f"model       {r.model}{size}", file=out)
    print(f"text        {r.text} (sha256 {r.text_sha256[:12]}), ctx {r.ctx}, {r.chunks}/{r.chunks_available} "
          f"windows, {r.tokens_scored} tokens scored", file=out)
    print(f"perplexity  {r.perplexity:.4f} +/- {r.perplexity_stderr:.4f}", file=out)
    if r.base is not None:
        print(f"base        {r.base}: perplexity {r.base_perplexity:.4f} (ratio {r.perplexity_ratio:.4f})", file=out)
        print(f"KLD         mean {r.kld_mean:.6f} +/- {r.kld_stderr:.6f}, median {r.kld_median:.6f}, "
              f"p99 {r.kld_p99:.6f}, max {r.kld_max:.6f}", file=out)
        print(f"top-1       {100 * r.top1_agreement:.2f}% same top token", file=out)
    return 0
