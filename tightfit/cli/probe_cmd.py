"""tightfit probe [--threads N] [--json]: measure this machine; `--hardware this` then uses the profile."""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    p.add_argument("--threads", type=int, help="threads to measure with (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")


def run(args) -> int:
    from ..probe import probe, save_profile

    profile = probe(args.threads, progress=not args.json)
    path = save_profile(profile)
    if args.json:
        print(json.dumps(profile, indent=1))
        return 0
    d, m = profile["device"], profile["measurements"]
    print(f"memory read {d['bandwidth'] / 1e9:.1f} GB/s, bf16 matmul {d['flops']['bf16'] / 1e9:.0f} GFLOP/s, "
          f"disk {d['disk'] / 1e9:.2f} GB/s, free memory {d['memory'] / 1e9:.1f} GB")
    for k, v in m["runtime kernels"].items():
        print(f"runtime {k} ({v['kind']}): {v['bytes_per_s'] / 1e9:.1f} GB/s, {v['seconds_per_call'] * 1e6:.0f} us/call "
              f"(of which {v['dispatch_s'] * 1e6:.0f} us dispatch)")
    f = m["fixed costs"]
    print(f"fixed cost per decoder layer {f['per_layer_s'] * 1e6:.1f} us, per token {f['per_token_s'] * 1e6:.1f} us")
    en, st = m["engine"]["resident"], m["engine"]["stream_extra"]
    print(f"fused decode step over layer-sized units: {en['4'] / 1e9:.1f} GB/s (4-bit), {en['8'] / 1e9:.1f} GB/s "
          f"(8-bit)")
    print(f"streamed layers re-read from the page cache at {m['page cache'] / 1e9:.1f} GB/s alone; in a decode "
          f"step streaming adds 1 s per {st['8'] / 1e9:.1f} GB (8-bit), {st['4'] / 1e9:.1f} GB (4-bit)")
    print(f"saved {path}", file=sys.stderr)
    return 0
