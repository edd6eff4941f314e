"""Generation as a Python generator: prefill once, then one decode step per yielded token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ContextError
from .model import Engine
from .sampling import SamplingParams, adjust_logits, logprobs_of, sample


@dataclass
class Step:
    token: int
    text: str  # the text this token completes (may be "" while a multi-byte character is pending)
    logprob: float | None = None
    top_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the last step


class Detokenizer:
    """Incremental decoding that never splits a multi-byte character or a merged space."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.done = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[len(self.done):], text
        return new

    def flush(self) -> str:
        """What is still held back (an incomplete character, shown as U+FFFD) at the end of generation."""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        new, self.done = text[len(self.done):], text
        return new


def check_fits(n_prompt: int, max_tokens: int, ctx: int) -> None:
    if n_prompt == 0:
        raise ContextError("the prompt is empty: give at least one token.")
    if n_prompt >= ctx:
        raise ContextError(f"the prompt has {n_prompt} tokens but the context holds {ctx}: shorten the prompt.")
    if n_prompt + max_tokens > ctx:
        raise ContextError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceed the context of "
                           f"{ctx}: lower max_tokens to at most {ctx - n_prompt}.")


class Decoder:
    """One sequence's generation after its prefill: from each position's logits, the next token and its Step.
    The same code serves a request alone (`generate`) and in the server's batch (runtime/batch.py), so a
    sequence's tokens do not depend on what it is batched with (up to the kernels' numerics)."""

    def __init__(self, tokenizer, prompt_ids: list[int], max_tokens: int, params: SamplingParams | None = None,
                 stop: list[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
                 constraint=None):
        self.params = params or SamplingParams()
        self.max_tokens, self.stop, self.logprobs, self.constraint = max_tokens, stop, logprobs, constraint
        self.gen = torch.Generator().manual_seed(self.params.seed) if self.params.seed is not None else None
        self.eos = set() if ignore_eos else _eos_ids(tokenizer)
        self.n_prompt, self.seen = len(prompt_ids), list(prompt_ids)
        self.detok = Detokenizer(tokenizer)
        self.held = ""  # text that may be the start of a stop string: not shown until it is known not to be
        p = self.params
        self.adjusting = bool(p.logit_bias or p.presence_penalty or p.frequency_penalty)
        self.counts = None  # generated-token counts for the penalties, made at the first step (the vocab size)
        self.n, self.finished = 0, False

    def step(self, logits: torch.Tensor) -> Step:
        """The Step of the token drawn from `logits` [vocab]; sets `finished` on the last one."""
        p, raw = self.params, logits
        if self.adjusting:
            if self.counts is None and (p.presence_penalty or p.frequency_penalty):
                self.counts = torch.zeros(logits.shape[-1], dtype=logits.dtype)
            logits = adjust_logits(logits, p, self.counts)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = sample(logits, p, self.gen, torch.tensor(self.seen) if p.repetition_penalty != 1.0 else None)
        lp, top = logprobs_of(raw, token, self.logprobs or 0) if self.logprobs is not None else (None, [])
        self.seen.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        self.n += 1
        if token in self.eos:
            self.finished = True
            return Step(token, self.held + self.detok.flush(), lp, top, "stop")
        if self.constraint is not None:
            self.constraint.advance(token)
        complete = self.constraint is not None and self.constraint.done
        last = self.n == self.max_tokens or complete
        held = self.held + self.detok.add(token) + (self.detok.flush() if last else "")
        if self.stop:
            hit = _first_stop(held, self.stop)
            if hit is not None:
                self.finished = True
                return Step(token, held[:hit], lp, top, "stop")
        keep = 0 if last or not self.stop else _partial_stop(held, self.stop)
        piece, self.held = held[:len(held) - keep], held[len(held) - keep:]
        self.finished = last
        return Step(token, piece, lp, top, None if not last else "stop" if complete else "length")


def generate(engine: Engine, tokenizer, prompt_ids: list[int], max_tokens: int = 128,
             params: SamplingParams | None = None, stop: list[str] | None = None, ignore_eos: bool = False,
             logprobs: int | None = None, ctx: int | None = None, prefill_chunk: int = 512,
             constraint=None) -> Iterator[Step]:
    """Yield one Step per generated token. Stops at EOS (unless ignore_eos), a stop string, max_tokens, or when
    `constraint` (a grammar: server/structured.py) is complete; it masks the tokens the grammar forbids."""
    ctx = min(ctx or engine.args.max_ctx, engine.args.max_ctx)
    check_fits(len(prompt_ids), max_tokens, ctx)
    cache = engine.new_cache(1, len(prompt_ids) + max_tokens)
    dec = Decoder(tokenizer, prompt_ids, max_tokens, params, stop, ignore_eos, logprobs, constraint)
    ids = torch.tensor([prompt_ids])
    for start in range(0, ids.shape[1], prefill_chunk):  # chunked prefill bounds activation memory
        logits = engine.forward(ids[:, start:start + prefill_chunk], start, cache)[0, -1]
    pos = ids.shape[1]
    while True:
        step = dec.step(logits)
        yield step
        if dec.finished:
            return
        logits = engine.forward(torch.tensor([[step.token]]), pos, cache)[0, -1]
        pos += 1


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that begins some stop string."""
    return max((n for s in stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0)


def _eos_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return ids
