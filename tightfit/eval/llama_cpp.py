"""Score the same windows with llama.cpp (through llama-cpp-python), for side-by-side checks.

llama-cpp-python is optional (the `bench` extra); this module imports it only when called.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import LlamaCppBuildError
from .windows import Windows


REBUILD_COMMAND = ("CMAKE_ARGS=\"$(sh bench/llama-cmake-args.sh)\" pip install --no-cache-dir --force-reinstall "
                   "--no-deps llama-cpp-python==0.3.36")
REBUILD = (f"rebuild it without AMX: {REBUILD_COMMAND} (pip's wheel cache ignores CMAKE_ARGS, so a wheel built "
           "earlier with default flags comes back unless the cache is bypassed)")


def check_build() -> None:
    """Refuse a llama-cpp-python build that would take the process down: one compiled for vector extensions this
    CPU lacks (an AVX-512 wheel dies with an illegal instruction on an AVX2-only CPU), found in a subprocess, or
    one whose AMX matmul is compiled in (in 0.3.36 it segfaults on the AMX Xeons we run on): a typed error
    before the first matmul."""
    info = _system_info()
    if "AMX_INT8 = 1" in info and os.environ.get("TIGHTFIT_ALLOW_LLAMA_AMX") != "1":
        raise LlamaCppBuildError(f"llama-cpp-python was built with AMX ({info.strip()}); {REBUILD}. "
                                 "Set TIGHTFIT_ALLOW_LLAMA_AMX=1 to use it anyway.")


@lru_cache(maxsize=1)
def _system_info() -> str:
    """llama.cpp's system info, read in a subprocess first (a build for another CPU kills the process that
    runs it)."""
    import signal
    import subprocess
    import sys

    code = "import llama_cpp; i = llama_cpp.llama_print_system_info(); print(i.decode() if isinstance(i, bytes) else i)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode in (-signal.SIGILL, 128 + signal.SIGILL) or "Illegal instruction" in r.stderr:
        raise LlamaCppBuildError("llama-cpp-python was built for another CPU: it stops with an illegal instruction "
                                 "here (an AVX-512 build on a CPU without AVX-512?). Rebuild it for this one: "
                                 f"{REBUILD_COMMAND}")
    if r.returncode != 0:
        raise LlamaCppBuildError(f"llama-cpp-python does not load here (exit {r.returncode}): {r.stderr[-500:]}")
    return r.stdout


def open_llama(path: str | os.PathLike, ctx: int, threads: int | None = None):
    from llama_cpp import Llama

    check_build()
    return Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                 n_threads=threads or os.cpu_count())


def tokenize(llm, text: str, add_bos: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def window_logprobs(llm, windows: Windows, i: int) -> torch.Tensor:
    """llama.cpp's log-probabilities at the scored positions of window i: [ctx-1-first, vocab]."""
    llm.reset()
    llm.eval(windows.tokens[i].tolist())
    logits = torch.from_numpy(np.array(llm.scores[windows.first : windows.ctx - 1], dtype=np.float32))
    return torch.log_softmax(logits, -1)


def window_nll(llm, windows: Windows) -> torch.Tensor:
    """Negative log-likelihoods at the scored positions of every window, from llama.cpp's logits."""
    return torch.cat([-window_logprobs(llm, windows, i).gather(-1, windows.targets(i)[:, None])[:, 0]
                      for i in range(windows.tokens.shape[0])])


def perplexity(path: str | Path, windows: Windows, threads: int | None = None) -> float:
    llm = open_llama(path, windows.ctx, threads)
    try:
        return math.exp(float(window_nll(llm, windows).double().mean()))
    finally:
        llm.close()
