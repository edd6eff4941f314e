"""Perplexity, and KL divergence / top-1 agreement against a base model, as llama-perplexity defines them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import TextError, TokenizerMismatchError
from .windows import Windows, adds_bos, make_windows, tokenize


@dataclass
class EvalResult:
    model: str
    ctx: int
    chunks: int
    chunks_available: int
    tokens_scored: int
    text_sha256: str
    text: str  # where the text came from
    perplexity: float
    perplexity_stderr: float
    nll_mean: float
    base: str | None = None
    base_perplexity: float | None = None
    perplexity_ratio: float | None = None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p90: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def window_logprobs(model, window: torch.Tensor, first: int) -> torch.Tensor:
    """fp32 log-probabilities at positions first .. ctx-2 of one window: [ctx-1-first, vocab]."""
    keep = window.shape[-1] - first
    logits = model(window[None], logits_to_keep=keep).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def kl_divergence(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P) per position, in nats, over the full vocabulary."""
    return (base_logp.exp() * (base_logp - logp)).sum(-1).clamp_min(0.0)


def check_same_tokenizer(model, base, ids: list[int], base_ids: list[int]) -> None:
    tm, tb = model.tokenizer, base.tokenizer
    wm, wb = model.config.vocab_size, base.config.vocab_size
    if wm != wb or tm.get_vocab() != tb.get_vocab() or ids != base_ids:
        why = (
            f"output vocabularies of {wm} and {wb} entries"
            if wm != wb
            else "different token tables" if tm.get_vocab() != tb.get_vocab() else "different tokenization of the text"
        )
        raise TokenizerMismatchError(
            f"BASE {base.source} and MODEL {model.source} do not share a tokenizer ({why}). KL divergence "
            "compares next-token distributions over one vocabulary: pass as BASE the model MODEL was made from."
        )


def _stderr(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def evaluate(model, text: str, *, text_name: str, text_sha256: str, ctx: int = 512, chunks: int | None = None,
             base=None, progress: bool = False, base_cache: dict | None = None) -> EvalResult:
    """Score MODEL (and BASE, on identical windows) over a text; memory is bounded by one window's logits.

    base_cache: a dict kept by the caller to reuse BASE's log-probabilities across evaluations of many models
    against one base (benchmarks); it then holds every scored window's fp32 log-probabilities.
    """
    for lm in (model, base):
        calib = (getattr(lm, "manifest", None) or {}).get("calibration") or {}
        if calib.get("sha256") == text_sha256:
            raise TextError(f"{lm.source} was calibrated on this text ({calib.get('text')}); evaluating on it would "
                            "flatter the model. Evaluate on held-out text (the default evaluation part).")
    ids = tokenize(model.tokenizer, text)
    if base is not None:
        check_same_tokenizer(model, base, ids, tokenize(base.tokenizer, text))
    bos = model.tokenizer.bos_token_id if adds_bos(model.tokenizer) else None
    win: Windows = make_windows(ids, ctx, chunks, bos)
    n = win.tokens.shape[0]
    streamed = hasattr(base, "prepare")  # eval/reference.py: the base runs layer by layer over all windows
    for lm in (model, base):
        if hasattr(lm, "prepare"):
            lm.prepare(win.tokens, win.first, progress)

    nll, base_nll, kld, agree = [], [], [], []
    for i in tqdm(range(n), desc="evaluating", unit="window", disable=not progress):
        window, targets = win.tokens[i], win.targets(i)
        logp = model.logprobs(i) if hasattr(model, "prepare") else window_logprobs(model.model, window, win.first)
        nll.append(-logp.gather(-1, targets[:, None])[:, 0])
        if base is not None:
            key = (base.source, text_sha256, ctx, i)
            if base_cache is not None and key in base_cache:
                base_logp = base_cache[key]
            else:
                base_logp = base.logprobs(i) if streamed else window_logprobs(base.model, window, win.first)
                if base_cache is not None:
                    base_cache[key] = base_logp
            kld.append(kl_divergence(base_logp, logp))
            agree.append(base_logp.argmax(-1) == logp.argmax(-1))
            base_nll.append(-base_logp.gather(-1, targets[:, None])[:, 0])

    nll = torch.cat(nll)
    ppl = math.exp(float(nll.mean()))
    result = EvalResult(
        model=model.source, ctx=ctx, chunks=n, chunks_available=win.n_available, tokens_scored=nll.numel(),
        text_sha256=text_sha256, text=text_name, perplexity=ppl, perplexity_stderr=ppl * _stderr(nll),
        nll_mean=float(nll.mean()),
    )
    kv = getattr(getattr(model, "model", None), "kv_format", None)  # the runtime's Engine has one
    result.extra["runner"] = "layered" if hasattr(model, "prepare") else "transformers" if kv is None else "runtime"
    if kv is not None:
        result.extra["kv_format"] = kv
    if getattr(model, "manifest", None):
        result.extra["bits_per_weight"] = model.manifest["bits_per_weight"]
        result.extra["method"] = model.manifest["method"]
    if base is not None:
        k = torch.cat(kld).double()
        result.base = base.source
        result.base_perplexity = math.exp(float(torch.cat(base_nll).mean()))
        result.perplexity_ratio = ppl / result.base_perplexity
        result.kld_mean = float(k.mean())
        result.kld_stderr = _stderr(k)
        q = torch.quantile(k, torch.tensor([0.5, 0.9, 0.99], dtype=k.dtype)).tolist()
        result.kld_median, result.kld_p90, result.kld_p99 = q
        result.kld_max = float(k.max())
        result.top1_agreement = float(torch.cat(agree).double().mean())
    return result
