"""Sampling as pure functions of logits: penalties, then temperature, top-k, top-p, min-p, then one draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TightfitError


class SamplingError(TightfitError, ValueError):
    """Sampling parameters out of range."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (CTRL-style, as llama.cpp and HF)
    seed: int | None = None
    # OpenAI's: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c[j] the count of token j
    # in the generated text so far; logit_bias adds (token id, bias) pairs to the logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
                  (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must be in [-2^63, 2^64)")]
        for ok, msg in checks:
            if not ok:
                raise SamplingError(f"{msg}; got {self}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    vals = out[seen]
    out[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return out


def adjust_logits(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    """Logits with logit_bias added and the presence / frequency penalties applied; `counts` [vocab] holds how
    often each token was generated so far."""
    if p.logit_bias:
        logits = logits.clone()
        ids, bias = zip(*p.logit_bias)
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype)
    if (p.presence_penalty or p.frequency_penalty) and counts is not None:
        logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with the tokens top-k / top-p / min-p exclude set to -inf (over the last
    dimension: one row of logits, or a batch of rows)."""
    # shifted by the row's maximum and the temperature kept above fp32's underflow: a tiny one (6e-205, found by
    # fuzzing) was 0 in fp32 and gave NaN probabilities; now the maximum stays 0 and the rest go to -inf (greedy)
    x = (logits - logits.amax(-1, keepdim=True)) / max(p.temperature, 1e-30)
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if p.top_p < 1.0:
        x = _top_p(x, p.top_p)
    return x


TOP_P_CANDIDATES = 1024


def _top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """x with every token outside the smallest prefix (by probability) that reaches top_p set to -inf. The prefix
    is looked for among the row's TOP_P_CANDIDATES largest first (a partial sort: sorting a 152k vocabulary took
    10 ms a row, more than a 1.5B model's batched decode step), and the whole row is sorted only where those do
    not reach top_p."""
    k = min(x.shape[-1], TOP_P_CANDIDATES)
    vals, order = torch.topk(x, k)
    probs = torch.exp(vals - torch.logsumexp(x, -1, keepdim=True))
    cum = probs.cumsum(-1)
    if k == x.shape[-1] or bool((cum[..., -1] >= top_p).all()):
        keep = cum - probs < top_p  # the smallest prefix reaching top_p
        return torch.full_like(x, float("-inf")).scatter(-1, order, vals.masked_fill(~keep, float("-inf")))
    sorted_x, order = torch.sort(x, descending=True)
    probs = torch.softmax(sorted_x, -1)
    drop = probs.cumsum(-1) - probs >= top_p
    return x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> int:
    """One token id from fp32 logits [vocab]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, p), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    lp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(lp, top) if top else None
    return float(lp[token]), ([] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))
