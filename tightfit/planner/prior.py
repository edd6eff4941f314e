"""The quality prior: predicted KLD (nats/token, against the unquantized model) of a plan, from the config alone.

    KLD = floor(engine) + scale(N) * sum_i share_i * rel_mse(format_i)

- rel_mse(format): relative weight MSE of round-to-nearest at the format on one fixed heavy-tailed matrix (Student-t,
  5 degrees of freedom; `reference_matrix`). It carries the prior's shape across formats; llama.cpp's types are
  measured on the same matrix by bench/llama_types.py (llama-quantize --pure), so both live on one axis.
- share_i: tensor i's share of the model's parameters. KLD is additive over small independent perturbations, and
  second order in each (linear in its noise power), so a plan's KLD is a parameter-weighted sum.
- scale(N): nats per unit of share-weighted relative MSE, by model size N (parameters). Small models are far more
  fragile: the same RTN 3-bit plan costs 1.667 nats on SmolLM2-135M and 0.163 on Qwen2.5-1.5B (measured here, both
  off-grid); beyond ~8B the published tables stop improving (llama.cpp's Q4_K_M: Llama-2-7B 0.0127, Llama-2-70B
  0.0132; Llama-3-8B 0.031, Llama-3-70B 0.055), so scale(N) falls as a power law onto a plateau:
      scale(N) = PLATEAU * (1 + (KNEE / N) ** ALPHA)
- floor(engine): what an engine adds whatever the weights: llama.cpp quantizes activations to 8 bits for its
  quantized dot products (q8_0/q8_1/q8_K blocks), which costs about what Q8_0 weights cost; engines that compute in
  16-bit (tightfit's runtime, vLLM's W4A16/W8A16 kernels) add none.

The constants are fitted by bench/whatif.py (`--fit`) on half of the points in bench/results/whatif.json (the
other half is held back and reported); the fit's inputs and its errors are written beside the table there.
"""

from __future__ import annotations

from functools import cache

import torch

from ..formats.weight import WeightFormat

DENSE = "bf16"

# fitted by bench/whatif.py --fit on the fit half of its quality points (see bench/README "What-if validation")
PLATEAU = 4.473  # nats per unit of share-weighted relative MSE, for N >> KNEE
KNEE = 5.30e8  # parameters
ALPHA = 1.702
# KLD that llama.cpp's 8-bit activation quantization adds to any quantized file (nats/token)
ENGINE_FLOOR = {"llama.cpp": 0.00144}


def reference_matrix() -> torch.Tensor:
    """The prior's fixed matrix: 256 x 1024 Student-t (5 dof), seed 0 (1024 wide: every group and K-type fits)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 1024, generator=g)
    chi = torch.randn(5, 256, 1024, generator=g).pow(2).sum(0)
    return z / (chi / 5).sqrt()


@cache
def format_rel_mse(fmt: str) -> float:
    """Relative weight MSE of round-to-nearest at a tightfit format on the reference matrix."""
    if fmt == DENSE:
        return 1e-6
    from ..quant.core import rtn

    return rtn(reference_matrix(), WeightFormat.parse(fmt)).error["weight_rel_mse"]


def size_scale(params: float, plateau: float = PLATEAU, knee: float = KNEE, alpha: float = ALPHA) -> float:
    """Nats of KLD per unit of parameter-weighted relative MSE for a model of `params` parameters (other constants:
    bench/whatif.py's fit)."""
    return plateau * (1.0 + (knee / max(params, 1.0)) ** alpha)


def prior_loss(spec, item, fmt: str) -> float:
    """One item's predicted KLD contribution at `fmt` (the planner's objective when no sensitivities were measured)."""
    if fmt == DENSE:
        return 0.0
    return size_scale(spec.params) * item.params / spec.params * format_rel_mse(fmt)
