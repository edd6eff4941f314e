"""The base of a KL-divergence comparison, run layer by layer in fp32 over all windows at once.

`eval --base` needs the original model's exact next-token distributions at every scored position. Loading it
whole in fp32 takes 4 bytes per parameter (32 GB for an 8B model); reading one decoder layer at a time and
applying it to every window's hidden states takes one layer plus windows x ctx x hidden activations, and the
final hidden states at the scored positions are all that is kept. Log-probabilities are made one window at a
time from them, so the full-vocabulary log-probs of all windows are never held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.families import family_of
from ..models.layered import head_weight, hidden_states


class StreamedReference:
    """A base model for `evaluate`: same tokenizer/config/source attributes as a LoadedModel."""

    def __init__(self, lazy, source: str):
        self.lazy, self.source, self.tokenizer, self.config = lazy, source, lazy.tokenizer, lazy.config
        self.manifest = None
        self._hidden = self._head = None
        self._key = None

    def prepare(self, tokens: torch.Tensor, first: int, progress: bool = False) -> None:
        """Final hidden states at positions first .. ctx-2 of every window (what `window_logprobs` scores)."""
        key = (tokens.shape, hash(tokens.numpy().tobytes()), first)
        if key == self._key:
            return
        self._hidden = hidden_states(self.lazy, tokens, keep_from=first, progress=progress)[:, :-1]
        self._head = head_weight(self.lazy)
        self._softcap = family_of(self.config).final_softcap(self.config)
        self._key = key

    @torch.inference_mode()
    def logprobs(self, i: int) -> torch.Tensor:
        logits = self._hidden[i] @ self._head.T
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return F.log_softmax(logits, dim=-1)


def load_reference(source: str, progress: bool = False):
    """The base for `evaluate`: streamed layer by layer where the family allows, else loaded whole (after a
    check that it fits)."""
    from ..models import load, load_lazy, resolve_source

    _, kind = resolve_source(source)
    if kind != "artifact":
        lazy = load_lazy(source)
        family_of(lazy.config, str(source))
        return StreamedReference(lazy, str(source))  # every family runs layer by layer
    return load(source, progress=progress)
