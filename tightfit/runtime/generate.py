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


def generate(engine: Engine, tokenizer, prompt_ids: list[int], max_tokens: int = 128,
             params: SamplingParams | None = None, stop: list[str] | None = None, ignore_eos: bool = False,
             logprobs: int | None = None, ctx: int | None = None, prefill_chunk: int = 512,
             constraint=None) -> Iterator[Step]:
    """Yield one Step per generated token. Stops at EOS (unless ignore_eos), a stop string, max_tokens, or when
    `constraint` (a grammar: server/structured.py) is complete; it masks the tokens the grammar forbids."""
    params = params or SamplingParams()
    ctx = min(ctx or engine.args.max_ctx, engine.args.max_ctx)
    check_fits(len(prompt_ids), max_tokens, ctx)
    cache = engine.new_cache(1, len(prompt_ids) + max_tokens)
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    eos = set() if ignore_eos else _eos_ids(tokenizer)
    ids = torch.tensor([prompt_ids])
    for start in range(0, ids.shape[1], prefill_chunk):  # chunked prefill bounds activation memory
        logits = engine.forward(ids[:, start:start + prefill_chunk], start, cache)[0, -1]
    pos = ids.shape[1]
    seen = list(prompt_ids)
    detok = Detokenizer(tokenizer)
    held = ""  # text that may be the start of a stop string: not shown until it is known not to be
    adjusting = bool(params.logit_bias or params.presence_penalty or params.frequency_penalty)
    for n in range(max_tokens):
        raw = logits
        if adjusting:
            logits = adjust_logits(logits, params, torch.tensor(seen[len(prompt_ids):], dtype=torch.long))
        if constraint is not None:
            logits = constraint.mask(logits)
        token = sample(logits, params, gen, torch.tensor(seen) if params.repetition_penalty != 1.0 else None)
        lp, top = logprobs_of(raw, token, logprobs or 0) if logprobs is not None else (None, [])
        seen.append(token)
        if token in eos:
            yield Step(token, held + detok.flush(), lp, top, "stop")
            return
        if constraint is not None:
            constraint.advance(token)
        complete = constraint is not None and constraint.done
        last = n == max_tokens - 1 or complete
        held += detok.add(token) + (detok.flush() if last else "")
        if stop:
            hit = _first_stop(held, stop)
            if hit is not None:
                yield Step(token, held[:hit], lp, top, "stop")
                return
        keep = 0 if last or not stop else _partial_stop(held, stop)
        piece, held = held[:len(held) - keep], held[len(held) - keep:]
        yield Step(token, piece, lp, top, None if not last else "stop" if complete else "length")
        if last:
            return
        logits = engine.forward(torch.tensor([[token]]), pos, cache)[0, -1]
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
