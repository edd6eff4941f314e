"""tightfit fit MODEL --hardware this [--max-memory SIZE] [--min-tok-s X] [--max-kld K] [--context N] -o OUT"""

from __future__ import annotations

import sys


def add_arguments(p):
    from ..quant.config import METHODS

    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("--hardware", default="this", help="'this' (probed on first use) or a catalog device")
    p.add_argument("--max-memory", metavar="SIZE", help="memory the weights, KV cache and activations may use")
    p.add_argument("--min-tok-s", type=float, help="decode tokens/s the plan must reach")
    p.add_argument("--max-kld", type=float, help="refuse plans predicting a larger KL divergence")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the artifact and report")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from ..fit import fit
    from ..io import parse_size
    from .common import quiet_libraries

    quiet_libraries(True)
    res = fit(args.model, args.output, hardware=args.hardware, min_tok_s=args.min_tok_s, max_kld=args.max_kld,
              max_memory=parse_size(args.max_memory) if args.max_memory else None, context=args.context,
              method=args.method, force=args.force, progress=sys.stderr.isatty(),
              log=lambda s: print(s, file=sys.stderr))
    p, m = res["plan"]["predicted"], res["measured"]
    print(f"KLD predicted {p['kld']:.4f} measured {m['kld']:.4f}; decode predicted {p['decode_tok_s']:.0f} "
          f"measured {m['decode_tok_s']:.0f} tok/s; {m['bits_per_weight']:.3f} bits per weight; "
          f"report {args.output}/report.md")
    return 0
