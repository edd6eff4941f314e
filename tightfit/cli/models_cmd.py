"""tightfit models [FOLDER ...] [--json]"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelNotFoundError


def add_arguments(p):
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="also look for .gguf files and model folders here")
    p.add_argument("--json", action="store_true", help="print a JSON list")


def run(args) -> int:
    from ..models.discover import discover

    for f in args.folders:
        if not Path(f).is_dir():
            raise ModelNotFoundError(f"{f!r} is not a folder; pass folders to search for models in.")
    found = discover([Path(f) for f in args.folders])
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path) if m.path else None, "format": m.format,
                           "size_bytes": m.size_bytes, "detail": m.detail} for m in found], indent=2))
        return 0
    width = max(len(m.name) for m in found)
    for m in found:
        size = f"{m.size_bytes / 1e6:8.1f} MB" if m.size_bytes else "        -  "
        print(f"{m.name:<{width}}  {m.format:<4}  {size}  {m.detail}")
    return 0
