"""GPTQ (Frantar et al., 2022): quantize columns one at a time, spreading each column's error over the columns
not yet quantized through the inverse Hessian of the layer's inputs.

Act-order (columns by decreasing Hessian diagonal), damping, static groups, blocked lazy updates. Act-order
without static groups forms groups in the permuted order, so the result carries g_idx: a per-column group index
that no GGML type and no torch CPU kernel holds. With static groups (or no act-order) column j is in group
j // group_size and the result copies into those formats unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import logging

import torch

from ..errors import QuantizeError
from ..formats.weight import WeightFormat
from .core import diagonal_blocks, grouped, minmax_params, nearest_level, pack_result, searched_params


log = logging.getLogger(__name__)


def factor(H: torch.Tensor, act_order: bool, damp: float):
    """What GPTQ needs of H alone: -> (undamped H with its dead diagonal set to 1, column order, upper Cholesky
    factor of the damped inverse Hessian in that order). A tensor quantized in row blocks shares one: at a 7B
    down_proj (18944 columns) each factorization and triangular inverse is ~4.5 TFLOP."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.shape[0])
    Hp = H[perm][:, perm]
    return H, perm, inverse_upper_cholesky(Hp, damp)


def _prepare(w: torch.Tensor, H: torch.Tensor, act_order: bool, damp: float, factored=None):
    """-> W (dead columns zeroed), and factor(H)'s (H, column order, inverse factor), reused where given."""
    if factored is None:
        factored = factor(H, act_order, damp)
    W = w.float().clone()
    W[:, torch.diag(H) == 0] = 0
    return (W, *factored)


def inverse_upper_cholesky(H: torch.Tensor, damp: float = 0.0, tries: int = 6) -> torch.Tensor:
    """Upper triangular U with U^T U = (H + damp * mean(diag H) * I)^-1, from one Cholesky factorization and one
    triangular inverse. The damping is raised tenfold (up to `tries` times) while the factorization fails: a
    Hessian summed from bf16 products, or of inputs spanning fewer directions than its width, is positive
    semi-definite only up to rounding.

    With J the order reversal and J H J = L L^T, H^-1 = (J L^-T J)(J L^-1 J) and J L^-1 J is upper triangular
    with a positive diagonal: the unique factor. The usual chol(cholesky_inverse(chol(H)), upper) costs two
    factorizations and a full inverse: at a 1.5B down_proj (8960 columns) that was half of GPTQ's time."""
    mean = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for k in range(tries):
        L, info = torch.linalg.cholesky_ex((H + damp * 10**k * mean * eye).flip(0, 1))
        if int(info) == 0:
            if k:
                log.info("GPTQ: a %d-wide Hessian factorized with damping %g", H.shape[0], damp * 10**k)
            return lower_triangular_inverse(L).flip(0, 1)
        damp = max(damp, 1e-4)
    raise QuantizeError(f"GPTQ: the Hessian of a {H.shape[0]}-wide input is not positive definite even with "
                        f"damping {damp * 10 ** (tries - 1):g} x its mean diagonal ({float(mean):.3g}): its "
                        "calibration inputs are degenerate (NaN, inf or all zero). Check the model's weights, "
                        "or quantize with --method rtn.")


def lower_triangular_inverse(L: torch.Tensor, base: int = 512) -> torch.Tensor:
    """L^-1 of a lower triangular L by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], the
    off-diagonal block two GEMMs. torch has no triangular inverse, and solve_triangular against I does n^3
    multiply-adds where this does about 2n^3/3 at GEMM speed: 1.6 s instead of 2.6 s at 8960 columns."""
    n = L.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    h = n // 2
    Ai, Di = lower_triangular_inverse(L[:h, :h], base), lower_triangular_inverse(L[h:, h:], base)
    out = torch.zeros_like(L)
    out[:h, :h], out[h:, h:] = Ai, Di
    out[h:, :h] = -(Di @ L[h:, :h]) @ Ai
    return out


def _sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int,
           quantize_column: Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]) -> None:
    """GPTQ's column loop over W (columns already in quantization order), updated in place.

    quantize_column(j, column, upcoming) returns column j dequantized; upcoming(n) gives the current,
    error-updated columns j .. j+n-1 (where dynamic groups read their range)."""
    in_f = W.shape[1]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            def upcoming(n: int, i: int = i, W1: torch.Tensor = W1, i2: int = i2) -> torch.Tensor:
                return torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :n]

            wcol = W1[:, i]
            err = (wcol - quantize_column(i1 + i, wcol, upcoming)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def _sweep_static(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, S: torch.Tensor, M: torch.Tensor | None,
                  lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column loop when every column's group parameters are known before it starts (static groups, or
    one group per row): W [rows, n] (fp32, contiguous, in quantization order) is updated in place; S, M
    [rows, n]: each column's scale and min (M None: symmetric); lo, hi [rows]: each row's code range; levels:
    a non-uniform grid's values (codes are then indices of the nearest level). -> the codes [rows, n] (as floats).

    The column loop inside each block runs in C (runtime/kernels/quant.cpp, whole rows per thread) where a
    compiler is found, else in torch; both round every operation alike, so the results are bit-equal. The
    update of the later columns after each block is one GEMM either way."""
    from ..runtime.kernels import quant_library

    rows, n = W.shape
    lib = quant_library()
    S = S.contiguous()
    M = None if M is None else M.contiguous()
    lo, hi = lo.float().contiguous(), hi.float().contiguous()
    Hinv = Hinv.contiguous()
    Q = torch.empty_like(W)
    threads = torch.get_num_threads()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        E = torch.empty(rows, i2 - i1)
        if lib is not None:
            lib.gptq_block(W.data_ptr(), S.data_ptr(), 0 if M is None else M.data_ptr(), lo.data_ptr(),
                           hi.data_ptr(), 0 if levels is None else levels.data_ptr(),
                           0 if levels is None else len(levels), Hinv.data_ptr(), rows, n, i1, i2 - i1, Q.data_ptr(),
                           E.data_ptr(), threads)
        else:
            W1, Hinv1 = W[:, i1:i2], Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j, wcol = i1 + i, W1[:, i]
                x = wcol - M[:, j] if M is not None else wcol
                if levels is None:
                    q = torch.clamp(torch.round(x / S[:, j]), lo, hi)
                    v = q
                else:
                    q = nearest_level(torch.where(S[:, j] == 0, 0.0, x / S[:, j]), levels).float()
                    v = levels[q.long()]
                deq = v * S[:, j] + M[:, j] if M is not None else v * S[:, j]
                err = (wcol - deq) / Hinv1[i, i]
                Q[:, j] = q
                E[:, i] = err
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        if i2 < n:
            W[:, i2:].addmm_(E, Hinv[i1:i2, i2:], alpha=-1)  # in place: no [rows, n] temporary per block
    return Q


def _per_column(params, fmt: WeightFormat, in_f: int):
    """Group parameters (scale, min or None) [rows, groups] -> each column's, [rows, in_f] in fp32, and each
    row's code range lo, hi [rows]: what _sweep_static takes."""
    s, m = params
    cols = torch.arange(in_f) // fmt.group_len(in_f)
    rows = s.shape[0]
    return (s.float()[:, cols], None if m is None else m.float()[:, cols],
            torch.full((rows,), float(fmt.qmin)), torch.full((rows,), float(fmt.qmax)))


def _static_params(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, clip_search: bool):
    """Each group's scale/min from the original columns: searched by output error, or min/max."""
    wg = grouped(W, fmt)
    return searched_params(wg, fmt, diagonal_blocks(H, fmt.group_len(W.shape[1]))) if clip_search \
        else minmax_params(wg, fmt)


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, *, act_order: bool = True, static_groups: bool = True,
         damp: float = 0.01, block_size: int = 128, clip_search: bool = True, report: bool = True,
         factored=None):
    """H: E[x x^T] of the layer's inputs over the calibration tokens, [in, in]. report: measure the result's
    output error through H (calibrate.guarded measures it itself, on more than one Hessian).

    clip_search: each group's scale/min is the clipped range whose round-to-nearest output error (through the
    group's block of H) is least, instead of the group's min/max. On the default model (off-grid, 3-bit g32)
    this takes GPTQ's KLD from 0.455 to 0.309 (bench/results/gptq-variants.json). factored: factor(H, act_order,
    damp), where the caller has it already (row blocks of one tensor)."""
    out_f, in_f = w.shape
    fmt.check_shape((out_f, in_f))
    gl = fmt.group_len(in_f)
    H_in = H
    W, H, perm, Hinv = _prepare(w, H, act_order, damp, factored)
    # super-block formats: static groups always (their super-scales span 8 groups, known before the sweep)
    # non-uniform grids likewise (the dynamic groups' column step rounds on a uniform grid)
    static = _static_params(W, H, fmt, clip_search) \
        if static_groups or fmt.group_size == 0 or fmt.superblock or fmt.grid != "uniform" else None
    W = W[:, perm]
    if static is not None:
        S, M, lo, hi = _per_column(static, fmt, in_f)
        Q = _sweep_static(W.contiguous(), Hinv, block_size, S[:, perm], None if M is None else M[:, perm], lo, hi,
                          fmt.levels)
        codes = Q[:, torch.argsort(perm)]
        return pack_result(fmt, codes, static[0], static[1], w.float(), H_in, report)

    H_perm = H[perm][:, perm]  # undamped, in the order dynamic groups form
    Q = torch.zeros_like(W)
    n_groups = fmt.groups(in_f)
    scales = torch.zeros(out_f, n_groups, dtype=fmt.scale_torch_dtype)
    mins = None if fmt.symmetric else torch.zeros(out_f, n_groups, dtype=fmt.scale_torch_dtype)
    col_group = torch.empty(in_f, dtype=torch.long)  # group of each permuted column
    current: list = [None, None]  # the dynamic group's scale, min

    def column(j: int, wcol: torch.Tensor, upcoming) -> torch.Tensor:
        g = j // gl
        if j % gl == 0:  # a new group starts: its parameters come from the (already updated) columns
            Hg = H_perm[j:j + gl, j:j + gl][None]
            s, m = searched_params(upcoming(gl)[:, None, :], fmt, Hg) if clip_search \
                else minmax_params(upcoming(gl)[:, None, :], fmt)
            current[:] = s[:, 0], (None if m is None else m[:, 0])
        s, m = current
        scales[:, g] = s
        if mins is not None:
            mins[:, g] = m
        col_group[j] = g
        x = wcol - m.float() if m is not None else wcol
        q = torch.clamp(torch.round(x / s.float()), fmt.qmin, fmt.qmax)
        Q[:, j] = q
        return q * s.float() + (m.float() if m is not None else 0)

    _sweep(W, Hinv, block_size, column)
    inv = torch.argsort(perm)
    codes = Q[:, inv]
    g_idx = col_group[inv].to(torch.int32) if act_order else None
    return pack_result(fmt, codes, scales, mins, w.float(), H_in, report, g_idx=g_idx)


def gptq_errors(w: torch.Tensor, H: torch.Tensor, fmts: Sequence[WeightFormat], *, act_order: bool = True,
                damp: float = 0.01, block_size: int = 128, clip_search: bool = True,
                H_eval: torch.Tensor | None = None) -> list[float]:
    """Output error tr(dW H_eval dW^T) of static-group GPTQ fitted to H, in each format, from one sweep over the
    columns. H_eval (default H): inputs GPTQ did not see, for an error that is not fitted to its own data.

    GPTQ treats rows independently given H, so the rows of every format are stacked and quantized together,
    each row with its format's levels and its group's parameters: one column loop instead of one per format
    (what the mixed-precision proxy needs for every candidate format of every tensor)."""
    out_f, in_f = w.shape
    for fmt in fmts:
        fmt.check_shape((out_f, in_f))
    grids = {f.grid for f in fmts}
    if len(grids) > 1:  # one sweep rounds on one grid: a sweep per grid
        errs = {}
        for g in grids:
            idx = [i for i, f in enumerate(fmts) if f.grid == g]
            errs.update(zip(idx, gptq_errors(w, H, [fmts[i] for i in idx], act_order=act_order, damp=damp,
                                             block_size=block_size, clip_search=clip_search, H_eval=H_eval)))
        return [errs[i] for i in range(len(fmts))]
    levels = fmts[0].levels
    H_in = (H if H_eval is None else H_eval).float()
    W, H, perm, Hinv = _prepare(w, H, act_order, damp)
    S, M, lo, hi = [], [], [], []
    for fmt in fmts:
        s, m, l, h = _per_column(_static_params(W, H, fmt, clip_search), fmt, in_f)
        S.append(s)
        M.append(torch.zeros(out_f, in_f) if m is None else m)
        lo.append(l)
        hi.append(h)
    S, M = torch.cat(S)[:, perm], torch.cat(M)[:, perm]
    lo, hi = torch.cat(lo), torch.cat(hi)
    Ws = W.repeat(len(fmts), 1)[:, perm].contiguous()
    Q = _sweep_static(Ws, Hinv, block_size, S, M, lo, hi, levels)
    D = (Q if levels is None else levels[Q.long()]) * S + M
    d = (w.float().repeat(len(fmts), 1) - D[:, torch.argsort(perm)]).reshape(len(fmts), out_f, in_f)
    return [float(((dk @ H_in) * dk).double().sum()) for dk in d]
