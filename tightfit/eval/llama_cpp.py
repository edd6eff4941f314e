"""Score the same windows with llama.cpp (through llama-cpp-python), for side-by-side checks.

llama-cpp-python is optional (the `bench` extra); this module imports it only when called.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .windows import Windows


def open_llama(path: str | os.PathLike, ctx: int, threads: int | None = None):
    from llama_cpp import Llama

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
