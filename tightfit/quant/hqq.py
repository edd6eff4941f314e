"""HQQ: calibration-free half-quadratic optimization of the group parameters (Badri & Shaji, 2023).

With the scale fixed, alternate (1) codes by rounding, (2) a sparse error term W_e by the generalized soft-
threshold of an l_p norm (p < 1), robust to outlier weights, (3) the zero point in closed form. Our formats
keep w = q * scale + min, so the zero point is the min; symmetric formats have no zero and refit the scale.
"""

from __future__ import annotations

import torch

from ..formats.weight import WeightFormat
from .core import grouped, minmax_params, pack_result, quantize_codes


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq(w: torch.Tensor, fmt: WeightFormat, H: torch.Tensor | None = None, *, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, iters: int = 20, report: bool = True):
    w = w.float()
    fmt.check_shape(tuple(w.shape))
    wg = grouped(w, fmt)
    scale, mn = minmax_params(wg, fmt)
    s = scale.float()
    m = mn.float() if mn is not None else None
    best = (s.clone(), None if m is None else m.clone())
    best_err = float("inf")
    for _ in range(iters):
        q = fmt.code_values(quantize_codes(wg, fmt, s, m))  # the levels the codes stand for
        wr = q * s[..., None] + (m[..., None] if m is not None else 0)
        err = float((wg - wr).abs().mean())
        if err < best_err:
            best_err, best = err, (s.clone(), None if m is None else m.clone())
        else:
            break
        we = shrink_lp(wg - wr, beta, p)
        target = wg - we
        if m is not None:
            m = (target - q * s[..., None]).mean(-1)
        else:
            s = (q * target).sum(-1) / (q * q).sum(-1).clamp_min(1e-12)
            s = torch.where(s == 0, torch.ones_like(s), s)
        beta *= kappa
    s, m = best
    if fmt.superblock:
        from .core import snap_superblock

        scale, mn = snap_superblock(s, m, fmt)
    else:
        scale = s.to(fmt.scale_torch_dtype)
        mn = None if m is None else m.to(fmt.scale_torch_dtype)
    return pack_result(fmt, quantize_codes(wg, fmt, scale, mn), scale, mn, w, H, report)
