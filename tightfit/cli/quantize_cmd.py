"""tightfit quantize MODEL --method {rtn,gptq,awq,hqq,awq-gptq} --bits B --group-size G [--sym] [--super-blocks]
[--format NAME] [--embed-format NAME] [--head-format NAME] [--target-bpw X] [--calib FILE] -o OUT"""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    from ..quant.config import METHODS

    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or a known name")
    p.add_argument("--method", choices=METHODS, default="awq-gptq",
                   help="quantization algorithm (default awq-gptq: AWQ's activation-aware scales, then GPTQ)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight code: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=32, help="32, 64, 128, or 0 for per-channel (default 32)")
    p.add_argument("--sym", action="store_true", help="symmetric codes (no min/zero per group)")
    p.add_argument("--super-blocks", action="store_true",
                   help="quantize the scales (and mins) too, in super-blocks of 256 weights as llama.cpp's K-quants "
                        "(group 32 only; asym4: Q4_K's 4.5 bpw instead of 5.0); rows not a multiple of 256 keep "
                        "plain group scales")
    p.add_argument("--format", metavar="NAME", dest="fmt",
                   help="the decoder weights' format by name, in place of --bits/--group-size/--sym/--super-blocks: "
                        "e.g. asym4-k32 (Q4_K), nl4-k32 (a non-uniform 4-bit grid, llama.cpp's IQ4_XS: 4.25 bpw) or "
                        "nl4-g32 (IQ4_NL)")
    p.add_argument("--embed-bits", type=int, default=8,
                   help="bits for the token embedding / output head, symmetric, group 32 (default 8; 0: as --bits)")
    p.add_argument("--embed-format", metavar="NAME",
                   help="the token embedding / output head's format by name, e.g. sym6-k32 (Q6_K), asym4-k32 or "
                        "sym8-g32 (overrides --embed-bits)")
    p.add_argument("--head-format", metavar="NAME",
                   help="the output head's own format, e.g. sym6-k32 with --embed-format asym4-k32 (llama.cpp's "
                        "Q4_K_M keeps an untied embedding at Q4_K, the head at Q6_K); a tied table takes it too")
    p.add_argument("--target-bpw", type=float, metavar="X",
                   help="mixed precision: choose each tensor's format to reach X bits per weight overall")
    p.add_argument("--calib", metavar="FILE", help="calibration text (default: the shipped calibration part)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--calib-generated", type=float, default=0.25, metavar="SHARE",
                   help="share of the calibration windows the model writes itself (default 0.25; 0: text only)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in their stored order")
    p.add_argument("--no-clip-search", action="store_true",
                   help="GPTQ: each group's scale from its min/max instead of the searched clipped range")
    p.add_argument("--dynamic-groups", action="store_true",
                   help="GPTQ with act-order: groups in permuted order (stores g_idx; no GGML type holds it)")
    p.add_argument("--plan", metavar="PLAN.json", help="execute a plan from `tightfit plan` (its per-tensor formats)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON; no progress bars")


def run(args) -> int:
    from ..formats.weight import WeightFormat
    from ..quant.api import quantize
    from ..quant.config import QuantConfig
    from .common import quiet_libraries

    quiet_libraries(True)
    fmt = WeightFormat.parse(args.fmt) if args.fmt else \
        WeightFormat(args.bits, args.group_size, args.sym, superblock=args.super_blocks)
    embed = None if args.embed_bits == 0 else WeightFormat(args.embed_bits, 32, True)
    if args.embed_format:
        embed = WeightFormat.parse(args.embed_format)
    head = WeightFormat.parse(args.head_format) if args.head_format else None
    cfg = QuantConfig(method=args.method, fmt=fmt, embed_fmt=embed, head_fmt=head, act_order=not args.no_act_order,
                      static_groups=not args.dynamic_groups, clip_search=not args.no_clip_search,
                      calib_samples=args.calib_samples, calib_ctx=args.calib_ctx,
                      calib_generated=args.calib_generated)
    if args.plan:
        from ..planner.plan_io import formats_from_plan

        cfg = formats_from_plan(args.plan, cfg, args.model)
    elif args.target_bpw is not None:
        from ..quant.mixed import plan_mixed

        cfg = plan_mixed(args.model, cfg, args.target_bpw, calib=args.calib, progress=not args.json)
    manifest = quantize(args.model, cfg, args.output, calib=args.calib, progress=not args.json, force=args.force)
    summary = {k: manifest[k] for k in ("method", "bits_per_weight", "size_bytes", "parameters", "calibration")}
    if "guard" in manifest:
        g = manifest["guard"]
        summary["rtn_fallbacks"] = {"tensors": len(g["rtn_fallbacks"]), "of": g["tensors"],
                                    "awq_scales_left_at_1": len(g["awq_scale_fallbacks"]),
                                    "held_out_windows": g["held_out_windows"]}
    summary["output"] = args.output
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.output}: {manifest['method']} {manifest['bits_per_weight']:.3f} bits per weight, "
              f"{manifest['size_bytes'] / 1e6:.1f} MB", file=sys.stderr)
        c = manifest.get("calibration") or {}
        if "generated_windows" in c:
            print(f"  calibration: {c['samples']} windows of {c['ctx']} tokens, {c['generated_windows']} of them "
                  f"written by the model" + (f" (none: {c['generated_skipped']})" if "generated_skipped" in c else ""),
                  file=sys.stderr)
        if "rtn_fallbacks" in summary:
            f = summary["rtn_fallbacks"]
            print(f"  checked on {f['held_out_windows']} held-out calibration windows: {f['tensors']} of {f['of']} "
                  f"tensors kept round-to-nearest (it was better there), {f['awq_scales_left_at_1']} AWQ scale "
                  "pairs left unscaled", file=sys.stderr)
    return 0
