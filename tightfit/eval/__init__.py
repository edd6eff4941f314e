"""Evaluation against the original: perplexity, KL divergence, top-1 agreement."""

from .perplexity import EvalResult, evaluate, kl_divergence
from .windows import Windows, make_windows, tokenize

__all__ = ["EvalResult", "Windows", "evaluate", "kl_divergence", "make_windows", "tokenize"]
