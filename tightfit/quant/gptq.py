"""GPTQ (Frantar et al., 2022): quantize columns one at a time, spreading each column's error over the columns
not yet quantized through the inverse Hessian of the layer's inputs.

Act-order (columns by decreasing Hessian diagonal), damping, static groups, blocked lazy updates. Act-order
without static groups forms groups in the permuted order, so the result carries g_idx: a per-column group index
that no GGML type and no torch CPU kernel holds. With static groups (or no act-order) column j is in group
j // group_size and the result copies into those formats unchanged.
"""

from __future__ import annotations

import torch

from ..formats.weight import WeightFormat
from .core import diagonal_blocks, grouped, minmax_params, pack_result, searched_params


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, *, act_order: bool = True, static_groups: bool = True,
         damp: float = 0.01, block_size: int = 128, clip_search: bool = True):
    """H: E[x x^T] of the layer's inputs over the calibration tokens, [in, in].

    clip_search: each group's scale/min is the clipped range whose round-to-nearest output error (through the
    group's block of H) is least, instead of the group's min/max. On the default model (off-grid, 3-bit g32)
    this takes GPTQ's KLD from 0.455 to 0.309 (bench/results/gptq-variants.json)."""
    W = w.float().clone()
    out_f, in_f = W.shape
    fmt.check_shape((out_f, in_f))
    gl = fmt.group_len(in_f)
    H_in = H.float()
    H = H_in.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(wg: torch.Tensor, Hg: torch.Tensor):  # wg [out, groups, gl], Hg [groups, gl, gl]
        return searched_params(wg, fmt, Hg) if clip_search else minmax_params(wg, fmt)

    static = None
    if static_groups or fmt.group_size == 0:
        static = params(grouped(W, fmt), diagonal_blocks(H, gl))  # [out, groups] from the original columns

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    H_perm = H.clone() if static is None else None  # undamped, in the order dynamic groups form
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    n_groups = fmt.groups(in_f)
    scales = torch.zeros(out_f, n_groups, dtype=fmt.scale_torch_dtype)
    mins = None if fmt.symmetric else torch.zeros(out_f, n_groups, dtype=fmt.scale_torch_dtype)
    col_group = torch.empty(in_f, dtype=torch.long)  # group of each permuted column
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                g = int(perm[j]) // gl
                s, m = static[0][:, g], (None if static[1] is None else static[1][:, g])
            else:
                g = j // gl
                if j % gl == 0:  # a new group starts: its parameters come from the (already updated) columns
                    block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gl]
                    s, m = params(block[:, None, :], H_perm[j:j + gl, j:j + gl][None])
                    s, m = s[:, 0], (None if m is None else m[:, 0])
            scales[:, g] = s
            if mins is not None:
                mins[:, g] = m
            col_group[j] = g
            wcol = W1[:, i]
            x = wcol - m.float() if m is not None else wcol
            q = torch.clamp(torch.round(x / s.float()), fmt.qmin, fmt.qmax)
            deq = q * s.float() + (m.float() if m is not None else 0)
            Q[:, j] = q
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = Q[:, inv]
    g_idx = None
    if static is None and act_order:
        g_idx = col_group[inv].to(torch.int32)
    return pack_result(fmt, codes, scales, mins, w.float(), H_in, g_idx=g_idx)

