"""tightfit plan MODEL|CONFIG --hardware NAME|this [--devices N] [--context N] [--batch N] [--min-tok-s X]
[--max-memory SIZE] [--engine vllm|llama.cpp|tightfit] [--json] [-o plan.json]"""

from __future__ import annotations

import json
import sys
from collections import Counter


def add_arguments(p):
    p.add_argument("model", metavar="MODEL|CONFIG", help="a model (GGUF, folder, known name), a config.json, or a "
                   "shipped config: llama-3.1-8b/70b/405b, qwen2.5-7b/72b, qwen3-8b/32b, qwen3-235b-a22b, deepseek-v3, "
                   "mixtral-8x7b, smollm2-135m")
    p.add_argument("--hardware", required=True, help="a device from `tightfit hardware`, or 'this'")
    p.add_argument("--devices", type=int, default=1, help="devices (tensor parallel), default 1")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-tok-s", type=float, help="decode tokens/s the plan must reach")
    p.add_argument("--max-memory", metavar="SIZE", help="memory the plan may use (default: the devices')")
    p.add_argument("--engine", choices=("vllm", "llama.cpp", "tightfit"),
                   help="what runs the plan (default: vllm on GPUs/NPUs, tightfit on CPUs and Apple SoCs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan (for `tightfit quantize --plan`)")


def run(args) -> int:
    from ..hardware import get_device
    from ..io import parse_size
    from ..planner.cost import Workload
    from ..planner.optimize import solve
    from ..planner.recipe import recipe
    from ..planner.spec import load_spec
    from .common import quiet_libraries

    quiet_libraries(True)
    spec = load_spec(args.model)
    device = get_device(args.hardware)
    w = Workload(args.context, args.batch, args.devices)
    plan = solve(spec, device, w, min_tok_s=args.min_tok_s,
                 max_memory=parse_size(args.max_memory) if args.max_memory else None, engine=args.engine)
    plan.model = args.model
    plan.recipe = recipe(spec, device, plan)
    if args.output:
        from ..io import atomic_path

        with atomic_path(args.output, directory=False, force=True) as tmp:
            tmp.write_text(json.dumps(plan.to_dict(), indent=1))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    m, pr = plan.memory_bytes, plan.predicted
    print(f"{spec.name}: {spec.params / 1e9:.2f}B parameters ({spec.active_params / 1e9:.2f}B active per token) on "
          f"{device.name} x{plan.devices}, context {plan.context}, batch {plan.batch}")
    for role_fmt, n in sorted(Counter(plan.tensors.values()).items(), key=lambda x: -x[1]):
        print(f"  {n:5d} tensor groups in {role_fmt}")
    where = Counter(plan.placement.values())
    print(f"  layers: {', '.join(f'{n} on {p}' for p, n in where.items())}; KV cache {plan.kv_format}"
          + ("; embedding rows read from disk" if plan.embedding_rows != "device" else ""))
    print(f"memory   weights {m['weights'] / 1e9:.2f} GB + KV {m['kv_cache'] / 1e9:.2f} GB + activations "
          f"{m['activations'] / 1e9:.2f} GB + {plan.engine} runtime {m['runtime'] / 1e9:.2f} GB = "
          f"{m['total'] / 1e9:.2f} GB of {m['capacity'] / 1e9:.1f} GB"
          + (f"; {m['offloaded_weights'] / 1e9:.2f} GB off the device" if m["offloaded_weights"] else ""))
    print(f"predicted decode {pr['decode_tok_s']:.1f} tok/s, prefill {pr['prefill_tok_s']:.0f} tok/s, "
          f"KLD {pr['kld']:.4f} ({plan.sensitivity} sensitivities)")
    for line in plan.recipe:
        print(f"run it: {line}")
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
