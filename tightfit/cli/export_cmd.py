"""tightfit export ARTIFACT --format {gguf,compressed-tensors} -o OUT [--strict] [--force]"""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    p.add_argument("artifact", metavar="ARTIFACT", help="a tightfit artifact folder (tightfit quantize ... -o DIR)")
    p.add_argument("--format", choices=["gguf", "compressed-tensors"], default="gguf",
                   help="gguf: llama.cpp, ollama; compressed-tensors: vLLM, llm-compressor (a folder)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    p.add_argument("--strict", action="store_true",
                   help="fail instead of re-quantizing a tensor whose format the target cannot hold exactly")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")


def run(args) -> int:
    from ..errors import NotAModelError
    from ..export.gguf_quant import export_gguf
    from ..models import resolve_source
    from .common import quiet_libraries

    quiet_libraries(True)
    path, kind = resolve_source(args.artifact)
    if kind != "artifact":
        raise NotAModelError(f"{args.artifact} is not a tightfit artifact (no manifest.json); quantize it first: "
                             f"tightfit quantize {args.artifact} -o DIR")
    if args.format == "compressed-tensors":
        from ..export.compressed_tensors import export_compressed_tensors

        report = export_compressed_tensors(path, args.output, strict=args.strict, force=args.force)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            inexact = [n for n, r in report["tensors"].items() if not r["exact"]]
            print(f"wrote {report['output']} ({report['dtype']}); {len(inexact)} tensors not copied exactly; "
                  f"{len(report['warnings'])} warnings about vLLM", file=sys.stderr)
        return 0
    report = export_gguf(path, args.output, strict=args.strict, force=args.force, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        inexact = [n for n, r in report["tensors"].items() if not r["exact"]]
        print(f"wrote {report['output']}: {report['bits_per_weight']:.3f} bits per weight "
              f"(artifact {report['artifact_bits_per_weight']:.3f}); "
              f"{'every tensor copied exactly' if not inexact else f'{len(inexact)} tensors re-quantized'}",
              file=sys.stderr)
    return 0
