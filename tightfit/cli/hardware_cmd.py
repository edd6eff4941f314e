"""tightfit hardware [--json]: the device catalog (and this machine's profile, after `tightfit probe`)."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")


def run(args) -> int:
    from ..hardware import catalog, get_device, profile_path

    devices = catalog()
    if profile_path().is_file():
        devices["this"] = get_device("this")
    if args.json:
        print(json.dumps({k: d.to_dict() for k, d in devices.items()}, indent=1))
        return 0
    print(f"{'name':16} {'memory':>8} {'bandwidth':>10} {'bf16':>10} {'int8':>10} {'link':>9}  device")
    for k, d in devices.items():
        f = d.flops
        mark = "" if d.verified else " (unverified)"
        print(f"{k:16} {d.memory / 1e9:6.0f}GB {d.bandwidth / 1e9:7.0f}GB/s {f.get('bf16', 0) / 1e12:7.1f}TF "
              f"{f.get('int8', 0) / 1e12:7.1f}TF {d.link / 1e9:6.0f}GB/s  {d.name}{mark}")
    return 0
