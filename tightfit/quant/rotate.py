"""Incoherence processing: a random rotation of the residual stream folded into the weights (QuaRot, Ashkboos et
al. 2024; SpinQuant's R1, Liu et al. 2024), with no cost at run time.

RMSNorm commutes with an orthogonal Q once its gain is moved into the linears that read it: norm(h Q) =
norm(h) Q for a gain of ones. So with every residual-stream vector h replaced by h Q:
  - the embedding's rows E -> E Q;
  - each linear reading a norm's output (q/k/v, gate/up, the head) W -> W diag(g) Q, the norm's gain g -> 1;
  - each linear writing into the stream (o_proj, down_proj) W -> Q^T W (a bias b -> b Q).
The model computes the same function (to rounding); its weights no longer have the few huge input columns that
massive activations put there (Sun et al. 2024). The result is a plain model of the same family: it quantizes,
runs and exports (GGUF, compressed-tensors) like any other. Measured, not assumed: on a tiny model with outlier
columns 3-bit RTN's KLD drops 4x; on the real Qwen2.5-Coder-1.5B at asym4-k32 RTN (groups of 32 already isolate
outliers) KLD rose from 0.0355 to 0.0616 (bench/results/real-1.5b-formats.json), so it is not applied by default.

A tied embedding/head becomes two tensors (E Q is looked up, E diag(g) Q is the head): the model grows by one
table, which the caller is told. Families whose norms sit on the stream's writes (Gemma's sandwich norms) or
whose router reads the stream (MoE) are refused.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedArchitectureError
from ..models.families import family_of


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] matrix (fp64): QR of a Gaussian matrix, the signs of R's diagonal fixed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def check_rotatable(config) -> None:
    fam = family_of(config)
    if fam.post_attn_norm or fam.post_mlp_norm:
        raise UnsupportedArchitectureError(
            f"{config.model_type}: its norms on the attention/MLP outputs (sandwich norms) do not commute with a "
            "rotation of the residual stream; quantize it without --rotate")
    if fam.moe is not None:
        raise UnsupportedArchitectureError(f"{config.model_type}: rotating an MoE model (its router reads the "
                                           "residual stream) is not supported; quantize it without --rotate")


class Rotation:
    """The residual-stream rotation of one model, applied one decoder layer at a time (rotate_layer) and to the
    embedding, final norm and head (rotate_rest)."""

    def __init__(self, config, seed: int = 0):
        check_rotatable(config)
        self.config, self.seed = config, seed
        self.fam = family_of(config)
        self.Q = random_orthogonal(config.hidden_size, seed)

    def _fold_in(self, state: dict, norm: str, readers: list[str]) -> None:
        """Readers of norm's output: W -> W diag(g) Q; the gain -> 1."""
        off = self.fam.norm_offset
        g = state[norm].double() + off
        for name in readers:
            w = state[name]
            state[name] = ((w.double() * g[None, :]) @ self.Q).to(w.dtype)
        state[norm] = torch.full_like(state[norm], 1.0 - off)

    def _fold_out(self, state: dict, writers: list[str]) -> None:
        """Writers into the stream: W -> Q^T W, bias b -> b Q."""
        for name in writers:
            w = state[name]
            state[name] = (self.Q.T @ w.double()).to(w.dtype)
            bias = name.removesuffix(".weight") + ".bias"
            if bias in state:
                state[bias] = (state[bias].double() @ self.Q).to(state[bias].dtype)

    def rotate_layer(self, state: dict, i: int) -> None:
        p, f = f"model.layers.{i}.", self.fam
        self._fold_in(state, f"{p}{f.attn_norm}.weight", [f"{p}{n}.weight" for n in f.qkv])
        self._fold_out(state, [f"{p}{f.o}.weight"])
        self._fold_in(state, f"{p}{f.mlp_norm}.weight", [f"{p}{n}.weight" for n in f.gate_up])
        self._fold_out(state, [f"{p}{f.down}.weight"])

    def rotate_rest(self, state: dict) -> None:
        """The embedding, the final norm and the head (a tied head is written as its own tensor)."""
        embed = state["model.embed_tokens.weight"]
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = embed.clone()
        state["model.embed_tokens.weight"] = (embed.double() @ self.Q).to(embed.dtype)
        self._fold_in(state, "model.norm.weight", ["lm_head.weight"])

    def record(self) -> dict:
        return {"transform": "rotate", "kind": "random orthogonal (Haar), residual stream, folded",
                "seed": self.seed, "width": self.config.hidden_size,
                "untied": bool(self.config.tie_word_embeddings)}
