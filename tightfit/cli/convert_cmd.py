"""tightfit convert MODEL -o DIR | tightfit convert MODEL --to gguf-f16 -o FILE.gguf"""

from __future__ import annotations

import sys
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("--to", choices=["hf", "gguf-f16"], default="hf",
                   help="hf: a Hugging Face folder (safetensors); gguf-f16: an F16 GGUF for llama.cpp")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (hf) or file (gguf-f16)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype of an hf folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--offgrid", type=float, metavar="SIGMA",
                   help="rescale channels where the function does not change, by exp(N(0, SIGMA^2)) factors "
                        "(moves a dequantized GGUF's weights off its quantization grid; about 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --offgrid factors and --rotate (default 0)")
    p.add_argument("--rotate", action="store_true",
                   help="fold a random rotation of the residual stream into the weights (incoherence processing: "
                        "the same function, weights without outlier columns; measure it: on Qwen2.5-1.5B at 4-bit "
                        "g32 RTN it quantized worse); a tied "
                        "embedding/head is untied (hf only)")


def run(args) -> int:
    import torch

    from .common import quiet_libraries

    quiet_libraries(True)
    from ..models import load_lazy

    lazy = load_lazy(args.model)  # both targets are written layer by layer: one layer in memory at a time
    hooks, rest_hook = [], None
    if args.offgrid:
        from ..quant.equivalence import check_rescalable, offgrid_layer

        check_rescalable(lazy.config)
        g = torch.Generator().manual_seed(args.seed)
        hooks.append(lambda state, i: offgrid_layer(state, i, lazy.config, g, args.offgrid))
    if args.rotate:
        from ..errors import FormatError
        from ..quant.rotate import Rotation

        if args.to != "hf":
            raise FormatError("--rotate writes a Hugging Face folder (--to hf); convert that folder to GGUF after")
        rotation = Rotation(lazy.config, args.seed)
        hooks.append(rotation.rotate_layer)
        rest_hook = rotation.rotate_rest
        if lazy.config.tie_word_embeddings:
            print("the tied embedding/head becomes two tensors (a rotated table is not its own head)", file=sys.stderr)
            lazy.config.tie_word_embeddings = False
    hook = (lambda state, i: [h(state, i) for h in hooks]) if hooks else None
    if args.to == "hf":
        from ..models.hf import save_hf_streamed

        out = save_hf_streamed(lazy, args.output, dtype=getattr(torch, DTYPES[args.dtype]), force=args.force,
                               layer_hook=hook, rest_hook=rest_hook, progress=True)
    else:
        from ..export.gguf import write_gguf_f16_streamed

        out = write_gguf_f16_streamed(lazy, args.output, Path(args.model).stem, layer_hook=hook, force=args.force,
                                      progress=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0
