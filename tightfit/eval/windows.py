"""Token windows defined exactly as llama.cpp's llama-perplexity cuts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TextError

MIN_WINDOWS = 2


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own setting puts BOS in front of a text (SmolLM2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(plain) and with_special[0] == bos


def tokenize(tokenizer, text: str) -> list[int]:
    """The whole text tokenized once, with BOS in front where the tokenizer adds one (never EOS)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *ids] if adds_bos(tokenizer) else list(ids)


@dataclass(frozen=True)
class Windows:
    """floor(N / ctx) consecutive windows; positions ctx/2 .. ctx-2 of each are scored (predicting the next token)."""

    tokens: torch.Tensor  # [n_windows, ctx], first token set to BOS where the model uses one
    ctx: int
    n_available: int  # windows the whole text holds (before --chunks)

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    def targets(self, i: int) -> torch.Tensor:
        return self.tokens[i, self.first + 1 :]


def make_windows(ids: list[int], ctx: int, chunks: int | None = None, bos: int | None = None) -> Windows:
    if ctx < 4:
        raise TextError(f"--ctx must be at least 4 tokens, got {ctx}")
    n = len(ids) // ctx
    if n < MIN_WINDOWS:
        raise TextError(
            f"the text is too short: it has {len(ids)} tokens, but {MIN_WINDOWS} windows of --ctx {ctx} need "
            f"{MIN_WINDOWS * ctx}. Use a longer text or a smaller --ctx."
        )
    if chunks is not None and chunks < MIN_WINDOWS:
        raise TextError(f"--chunks must be at least {MIN_WINDOWS}, got {chunks}")
    used = n if chunks is None else min(n, chunks)
    tokens = torch.tensor(ids[: used * ctx], dtype=torch.long).reshape(used, ctx)
    if bos is not None:
        tokens[:, 0] = bos
    return Windows(tokens, ctx, n)
