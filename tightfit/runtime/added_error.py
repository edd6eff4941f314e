"""The error a runtime layout adds to an artifact's weight (reported at load as runtime_added_error): relative
MSE and SQNR of the weight the kernel multiplies by against the artifact's dequantized weight."""

from __future__ import annotations

import torch

from ..quant.core import QuantizedWeight, rel_error


def scale_rounding_error(lin, qw: QuantizedWeight, codes_of, lut, low: int, rows: int = 2048) -> dict:
    """Relative MSE and SQNR of the kernel's weight against the artifact's. Both are v d + m per block of
    lin.scale_group weights on the same codes v (u = code - qmin, or lut[u] on a non-uniform grid), so the
    difference is v (d' - d) + (m' - m) and its square sums per block from sum(v) and sum(v^2): exact in fp64,
    without dequantizing either weight (that was two thirds of a 1.5B artifact's load time). codes_of() gives
    the int16 codes in the kernel's column order; it is called only where some scale or min was rounded."""
    n, k = qw.shape
    s = lin.scale_group
    reps = qw.fmt.group_len(k) // s

    def params(r0, r1):  # the artifact's (d, m) and the kernel's differences from them, per block
        da = qw.scales[r0:r1].double()
        ma = (qw.mins[r0:r1].double() if qw.mins is not None else torch.zeros_like(da)) + low * da
        da, ma = da.repeat_interleave(reps, 1), ma.repeat_interleave(reps, 1)
        g = lin.group_scales(r0, r1).double()
        return da, ma, g[0] - da, g[1] - ma

    d32 = qw.scales.float()
    m32 = (qw.mins.float() if qw.mins is not None else torch.zeros_like(d32)) + low * d32
    g32 = lin.group_scales(0, n)
    if reps > 1:
        g32 = g32[:, :, ::reps]
    if torch.equal(g32[0], d32) and torch.equal(g32[1], m32):
        rel = 0.0  # every scale and min copied exactly (the usual case: fp16 in the artifact already)
    else:
        num = den = 0.0
        codes = codes_of()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            u = codes[r0:r1] - qw.fmt.qmin
            v = (u if lut is None else lut[u.long()]).to(torch.int32).view(r1 - r0, k // s, s)
            s1, s2 = v.sum(-1).double(), (v * v).sum(-1).double()
            da, ma, dd, dm = params(r0, r1)
            num += float((dd * dd * s2 + 2 * dd * dm * s1 + s * dm * dm).sum())
            den += float((da * da * s2 + 2 * da * ma * s1 + s * ma * ma).sum())
        rel = max(num, 0.0) / max(den, 1e-30)
    return rel_error(rel)


def added_error(qw: QuantizedWeight, packed, sz, group: int, pieces: int, perm) -> dict:
    """weight_error of what torch's int4 op multiplies by (codes with bf16 scales/zeros, summed over pieces)."""
    inv = None if perm is None else torch.argsort(perm)
    k = qw.shape[1]

    def rows(r0, r1):
        g = sz[r0:r1].float().repeat_interleave(group, 1)
        w = ((packed[r0:r1].float() - 8) * g[..., 0] + g[..., 1]).reshape(-1, pieces, k).sum(1)
        return w if inv is None else w[:, inv]
    return chunked_error(qw, rows)


def chunked_error(qw: QuantizedWeight, runtime_rows, rows: int = 1024) -> dict:
    """Relative MSE and SQNR of the runtime's weight against the artifact's, a block of rows at a time."""
    num = den = 0.0
    for r in range(0, qw.shape[0], rows):
        part = QuantizedWeight(qw.fmt, qw.data[r:r + rows], qw.scales[r:r + rows],
                               None if qw.mins is None else qw.mins[r:r + rows], qw.g_idx,
                               in_features=qw.in_features, packed=qw.packed)
        w = part.dequantize()
        num += float(((w - runtime_rows(r, r + rows)).double() ** 2).sum())
        den += float((w.double() ** 2).sum())
    rel = num / max(den, 1e-30)
    return rel_error(rel)
