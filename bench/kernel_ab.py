"""Two builds of the runtime's kernel (qgemm.cpp and its headers at two git revisions) side by side, interleaved.

Both builds are compiled with the runtime's own flags for this CPU and loaded into one process. Every call of one
alternates with a call of the other, so the drift of a shared machine hits both alike. Two tests:
- single linears: random weights of Qwen2.5-1.5B's shapes in each format, for 1, 2, 3 and 512 tokens; the median
  of the paired time ratios (new / old) and each build's median;
- with --gguf, whole decode steps of the engine (16 tokens a round after a 512-token prompt), the builds swapped in
  the fused decode step and the head.

    python bench/kernel_ab.py --old HEAD~3 [--new WORKTREE] [--gguf FILE] [--threads 1 2] -o results/kernel_ab.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KDIR = "tightfit/runtime/kernels"
SHAPES = {"gate_up": (17920, 1536), "down": (1536, 8960), "qkv": (2048, 1536)}


def build(rev: str, into: Path) -> ctypes.CDLL:
    """qgemm.cpp with its headers at `rev` (WORKTREE: as the files are now), compiled and loaded."""
    from tightfit.runtime import kernels

    into.mkdir(parents=True)
    if rev == "WORKTREE":
        for f in (ROOT / KDIR).iterdir():
            if f.suffix in (".cpp", ".h"):
                (into / f.name).write_bytes(f.read_bytes())
    else:
        names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{KDIR}"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        for name in names:
            if name.endswith((".cpp", ".h")):
                (into / name).write_bytes(subprocess.run(["git", "show", f"{rev}:{KDIR}/{name}"], cwd=ROOT,
                                                         check=True, capture_output=True).stdout)
    lib = kernels._load(kernels._cxx(), into / "qgemm.cpp", kernels.qgemm_flags())
    if lib is None:
        raise SystemExit(f"the kernel at {rev} did not build")
    ref = kernels.library()
    for name, fn in vars(ref).items():  # the signatures the runtime set
        if hasattr(fn, "argtypes"):
            f = getattr(lib, name)
            f.argtypes, f.restype = fn.argtypes, fn.restype
    return lib


def use(lib: ctypes.CDLL) -> None:
    from tightfit.runtime import kernels

    kernels.library = lambda: lib


def linears(libs, formats, tokens, threads, pairs) -> list[dict]:
    from tightfit.formats.weight import WeightFormat
    from tightfit.quant.core import rtn
    from tightfit.runtime.linear import from_quantized

    rows = []
    g = torch.Generator().manual_seed(0)
    for fname in formats:
        for sname, (n, k) in SHAPES.items():
            lin = from_quantized(rtn(torch.randn(n, k, generator=g) * 0.02, WeightFormat.parse(fname), report=False),
                                 check=False)
            for m in tokens:
                x = torch.randn(m, k, generator=g)
                ys = []
                for lib in libs:
                    use(lib)
                    ys.append(lin(x))
                for th in threads:
                    torch.set_num_threads(th)
                    t, ratio = ([], []), []
                    for r in range(pairs if m < 64 else max(4, pairs // 16)):
                        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                            use(libs[i])
                            s = time.perf_counter()
                            lin(x)
                            t[i].append(time.perf_counter() - s)
                        ratio.append(t[1][-1] / t[0][-1])
                    row = {"format": fname, "shape": sname, "n": n, "k": k, "tokens": m, "threads": th,
                           "old_ms": statistics.median(t[0]) * 1e3, "new_ms": statistics.median(t[1]) * 1e3,
                           "new_over_old": statistics.median(ratio),
                           "max_rel_diff": float((ys[0] - ys[1]).norm() / ys[0].norm())}
                    rows.append(row)
                    print(f"{fname:10s} {sname:8s} {m:4d} tok {th} thr: new/old {row['new_over_old']:.3f} "
                          f"({row['old_ms']:.3f} -> {row['new_ms']:.3f} ms)", file=sys.stderr)
    return rows


def decode(libs, path: Path, threads, rounds) -> list[dict]:
    from tightfit.data import EVALUATION, read_part
    from tightfit.runtime.load import load_engine

    eng, tok, _, _ = load_engine(path)
    ids = tok(read_part(EVALUATION))["input_ids"][:512 + 16]
    cache = eng.new_cache(1, 1024)
    eng.forward(torch.tensor([ids[:512]]), 0, cache)
    fused = eng.fused()
    if fused is None:
        raise SystemExit(f"{path}: the engine does not take the fused decode step")
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        t, ratio = ([], []), []
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                eng._fused = (libs[i], *fused[1:])
                use(libs[i])
                s = time.perf_counter()
                for pos in range(512, 512 + 16):
                    eng.forward(torch.tensor([[ids[pos]]]), pos, cache)[0, -1].argmax()
                t[i].append(16 / (time.perf_counter() - s))
            ratio.append(t[1][-1] / t[0][-1])
        row = {"file": path.name, "threads": th, "old_tok_s": statistics.median(t[0]),
               "new_tok_s": statistics.median(t[1]), "new_over_old_speed": statistics.median(ratio)}
        rows.append(row)
        print(f"decode {th} thr: {row['old_tok_s']:.2f} -> {row['new_tok_s']:.2f} tok/s "
              f"({row['new_over_old_speed']:.3f}x)", file=sys.stderr)
    eng._fused = fused
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision of the first build")
    ap.add_argument("--new", default="WORKTREE", help="git revision of the second (default: the files as they are)")
    ap.add_argument("--formats", nargs="*", default=["asym4-k32", "sym6-k16", "asym4-g32"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 3, 512])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--pairs", type=int, default=60, help="interleaved calls of each build per case")
    ap.add_argument("--gguf", type=Path, help="also time whole decode steps of this model")
    ap.add_argument("--rounds", type=int, default=6, help="decode rounds of 16 steps per build")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    from tightfit.runtime.kernels import library

    if library() is None:
        raise SystemExit("tightfit's kernel does not run on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(args.old, Path(tmp) / "old"), build(args.new, Path(tmp) / "new")]
        result = {"old": args.old, "new": args.new, "linears": linears(libs, args.formats, args.tokens, args.threads,
                                                                          args.pairs)}
        if args.gguf:
            result["decode"] = decode(libs, args.gguf, args.threads, args.rounds)
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
