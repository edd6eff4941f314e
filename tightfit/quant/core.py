"""The quantized weight, group parameters, and round-to-nearest: shared by every algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..formats.weight import SUPER_BLOCK, WeightFormat, pack, unpack


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group scale (and min, for asymmetric formats) of one [out, in] weight.

    g_idx maps each input column to its group; it is None when column j is in group j // group_size (every
    format llama.cpp or torch's kernels hold). GPTQ with act-order and no static groups needs it.
    """

    fmt: WeightFormat
    data: torch.Tensor  # int16 codes [out, in], or after compact() the packed uint8 bytes [out, in * bits / 8]
    scales: torch.Tensor  # [out, groups], fmt.scale_dtype
    mins: torch.Tensor | None  # [out, groups] for asymmetric formats
    g_idx: torch.Tensor | None = None  # int32 [in]
    error: dict = field(default_factory=dict)  # what the quantizer measured of its own loss
    in_features: int = 0
    packed: bool = False
    # a GGUF K-quant's own super-block scales (formats.ggml.super_scales), which the runtime's kernel holds as they
    # are; None: recovered from the effective scales where needed
    supers: tuple | None = None

    def __post_init__(self):
        if not self.packed:
            self.in_features = self.data.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def codes(self) -> torch.Tensor:
        return unpack(self.data, self.fmt, self.in_features) if self.packed else self.data

    @property
    def packed_bytes(self) -> torch.Tensor:
        return self.data if self.packed else pack(self.data, self.fmt)

    def compact(self) -> QuantizedWeight:
        """Keep the codes packed (bits/8 bytes per weight instead of 2), as a layer-by-layer job must."""
        if not self.packed:
            self.data, self.packed = pack(self.data, self.fmt), True
        return self

    def column_groups(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features) // self.fmt.group_len(self.in_features)

    def dequantize(self) -> torch.Tensor:
        cols = self.column_groups()
        w = self.fmt.code_values(self.codes) * self.scales.float()[:, cols]
        if self.mins is not None:
            w += self.mins.float()[:, cols]
        return w


def grouped(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """[out, in] -> [out, groups, group_len]"""
    out_f, in_f = w.shape
    return w.reshape(out_f, fmt.groups(in_f), fmt.group_len(in_f))


def group_range(wg: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, ...]:
    """What a group's parameters are made from: (its weight of largest magnitude, with its sign) for symmetric
    formats, (min, max) otherwise. wg: [..., group_len] -> tensors [...]."""
    if fmt.symmetric:
        idx = wg.abs().argmax(-1, keepdim=True)
        return (wg.gather(-1, idx).squeeze(-1),)
    return wg.amin(-1), wg.amax(-1)


def _fp16_positive(x: torch.Tensor) -> torch.Tensor:
    """x (>= 0) rounded to a positive fp16 value, as fp32: the smallest subnormal for 0, fp16's largest at most."""
    return x.clamp(2.0**-24, 65504.0).half().float()


def _force_top(codes: torch.Tensor, values: torch.Tensor, top: float) -> torch.Tensor:
    """codes with the code of each super-block's largest |value| set to +-top: d = that scale / top, exactly."""
    idx = values.abs().argmax(-1, keepdim=True)
    sign = torch.where(values.gather(-1, idx) < 0, -1.0, 1.0)
    return codes.scatter(-1, idx, sign * top)


def snap_superblock(scale: torch.Tensor, mn: torch.Tensor | None, fmt: WeightFormat):
    """Group parameters [..., groups] made representable in a super-block format: each run of 8 groups (256
    weights) shares one fp16 d (and dmin); each group keeps an integer code of it. -> effective scale (and min),
    fp32, each exactly d * code. Asymmetric: the min is snapped first (never above 0, as Q4_K's -dmin * m), then
    the scale is refitted so that the group's top stays where it was."""
    top = float(fmt.super_code_max)
    shape = scale.shape
    per = SUPER_BLOCK // fmt.group_size
    s = scale.float().reshape(*shape[:-1], shape[-1] // per, per)
    if fmt.symmetric:
        d = _fp16_positive(s.abs().amax(-1, keepdim=True) / top)
        sc = torch.round(s / d).clamp(-top, top)
        sc = torch.where(sc == 0, torch.where(s < 0, -1.0, 1.0), sc)
        return (d * _force_top(sc, s, top)).reshape(shape), None
    lo = mn.float().reshape(s.shape)
    hi = lo + s * fmt.qmax
    neg = (-lo).clamp_min(0)
    dmin = neg.amax(-1, keepdim=True) / top
    dmin = torch.where(dmin > 0, _fp16_positive(dmin), 0.0)
    m = torch.where(dmin > 0, torch.round(neg / dmin.clamp_min(2.0**-24)).clamp(0, top), 0.0)
    m = torch.where(dmin > 0, _force_top(m, neg, top), 0.0)
    mn_q = -(dmin * m)
    fitted = ((hi - mn_q) / fmt.qmax).clamp_min(0)
    d = _fp16_positive(fitted.amax(-1, keepdim=True) / top)
    sc = _force_top(torch.round(fitted / d).clamp(1, top), fitted, top)
    return (d * sc).reshape(shape), mn_q.reshape(shape)


def range_params(rng: tuple[torch.Tensor, ...], fmt: WeightFormat, clip: torch.Tensor | float = 1.0):
    """Scale (and min) from group_range's result shrunk by `clip`, rounded to the format's scale dtype (super-
    block formats: snapped to their codes; the groups are the last dimension)."""
    if fmt.superblock:
        if fmt.symmetric:
            return snap_superblock(rng[0] * clip / fmt.low_level, None, fmt)
        lo, hi = rng[0] * clip, rng[1] * clip
        return snap_superblock((hi - lo) / fmt.qmax, lo, fmt)
    if fmt.symmetric:
        # the weight of largest magnitude, with its sign, lands on the lowest level (e.g. -8 for 4 bits)
        scale = rng[0] * clip / fmt.low_level
        # a group of zeros: scale 1 codes them as 0 exactly; a non-uniform grid has no 0 level, scale 0 holds them
        scale = torch.where(scale == 0, 0.0 if fmt.grid != "uniform" else 1.0, scale)
        return scale.to(fmt.scale_torch_dtype), None
    lo, hi = rng[0] * clip, rng[1] * clip
    scale = (hi - lo) / fmt.qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.to(fmt.scale_torch_dtype), lo.to(fmt.scale_torch_dtype)


def minmax_params(wg: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | float = 1.0):
    """Scale (and min) per group from the group's range, shrunk by `clip`, rounded to the format's scale dtype.

    wg: [..., group_len] -> scale [...], min [...] or None.
    """
    return range_params(group_range(wg, fmt), fmt, clip)


# range ratios a group's parameters are searched over (AWQ's clip search; GPTQ's static groups)
CLIPS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70)


def diagonal_blocks(H: torch.Tensor, group_len: int) -> torch.Tensor:
    """[in, in] -> [groups, group_len, group_len]: the Hessian block of each group's columns."""
    n = H.shape[0] // group_len
    return torch.stack([H[g * group_len:(g + 1) * group_len, g * group_len:(g + 1) * group_len] for g in range(n)])


def searched_params(wg: torch.Tensor, fmt: WeightFormat, Hb: torch.Tensor, clips=CLIPS):
    """Per (row, group) the clipped range whose round-to-nearest error d least hurts the output, d^T H_g d.

    wg: [out, groups, group_len]; Hb: [groups, group_len, group_len] (diagonal_blocks). -> scale, min (or None).
    Clipping trades a larger error on a few large weights for a finer grid on the rest; minmax (clip 1) is
    among the candidates, so the result is never worse than minmax by this measure. The candidates' parameters
    come from torch; their errors from quant.cpp's search_clips where it is compiled (one pass over each group
    with its Hessian block in cache), else from the same arithmetic in torch."""
    from ..runtime.kernels import quant_library

    rng = group_range(wg, fmt)
    cands = [range_params(rng, fmt, c) for c in clips]
    S = torch.stack([c[0] for c in cands])
    M = None if fmt.symmetric else torch.stack([c[1] for c in cands])
    lib = quant_library()
    if lib is not None:
        w = wg.float().contiguous()
        Sf = S.float().contiguous()
        Mf = None if M is None else M.float().contiguous()
        Hf = Hb.float().contiguous()
        best = torch.empty(wg.shape[:2], dtype=torch.int32)
        lv = fmt.levels
        lib.search_clips(w.data_ptr(), w.shape[0], w.shape[1], w.shape[2], Sf.data_ptr(),
                         0 if Mf is None else Mf.data_ptr(), len(clips), Hf.data_ptr(), float(fmt.qmin),
                         float(fmt.qmax), 0 if lv is None else lv.data_ptr(), 0 if lv is None else len(lv),
                         best.data_ptr(), torch.get_num_threads())
        idx = best.long()[None]
    else:
        best_err = torch.full(wg.shape[:2], float("inf"))
        idx = torch.zeros(wg.shape[:2], dtype=torch.long)
        for k, (scale, mn) in enumerate(cands):
            d = wg - dequantize_codes(quantize_codes(wg, fmt, scale, mn), scale, mn, fmt)
            err = torch.einsum("ogi,gij,ogj->og", d, Hb, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            idx = torch.where(better, k, idx)
        idx = idx[None]
    scale, mn = S.gather(0, idx)[0], None if M is None else M.gather(0, idx)[0]
    if fmt.superblock:  # each candidate had its own super-scales; the chosen mix shares one per 256 weights
        scale, mn = snap_superblock(scale, mn, fmt)
    return scale, mn


def quantize_codes(wg: torch.Tensor, fmt: WeightFormat, scale: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
    """Round-to-nearest codes of wg [..., n] for group parameters [...] (already in the scale dtype); on a
    non-uniform grid the index of the nearest level."""
    s = scale.float()[..., None]
    x = wg - mn.float()[..., None] if mn is not None else wg
    if fmt.grid != "uniform":
        return nearest_level(torch.where(s == 0, 0.0, x / s), fmt.levels).float()
    return torch.clamp(torch.round(x / s), fmt.qmin, fmt.qmax)


def nearest_level(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest each value (ties to the lower one): the count of midpoints below it, as
    quant.cpp's nearest_level counts them."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v.contiguous(), mids)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None,
                     fmt: WeightFormat | None = None) -> torch.Tensor:
    w = (fmt.code_values(q) if fmt is not None else q) * scale.float()[..., None]
    return w + mn.float()[..., None] if mn is not None else w


def rtn_error(w: torch.Tensor, fmt: WeightFormat, clip=1.0) -> torch.Tensor:
    """w - RTN(w) (min/max group parameters shrunk by clip) without building a QuantizedWeight: what the
    sensitivity pricing needs for each of ~24 formats of every tensor (it was most of that step's time)."""
    wg = grouped(w, fmt)
    scale, mn = minmax_params(wg, fmt, clip)
    return (wg - dequantize_codes(quantize_codes(wg, fmt, scale, mn), scale, mn, fmt)).reshape(w.shape)


def fisher_loss(w: torch.Tensor, F: torch.Tensor, fmt: WeightFormat) -> float:
    """sum F (w - RTN(w))^2 in fp64: rtn_error's rounding weighted by F, in one pass through quant.cpp where it
    is compiled (the group parameters still come from torch), else through rtn_error."""
    from ..runtime.kernels import quant_library

    lib = quant_library()
    if lib is None:
        d = rtn_error(w, fmt)
        return float((F * d * d).sum(dtype=torch.float64))
    w = w.float().contiguous()
    F = F.float().contiguous()
    wg = grouped(w, fmt)
    scale, mn = minmax_params(wg, fmt)
    S = scale.float().contiguous()
    M = None if mn is None else mn.float().contiguous()
    lv = fmt.levels
    return lib.fisher_loss(w.data_ptr(), F.data_ptr(), S.numel(), wg.shape[-1], S.data_ptr(),
                           0 if M is None else M.data_ptr(), float(fmt.qmin), float(fmt.qmax),
                           0 if lv is None else lv.data_ptr(), 0 if lv is None else len(lv),
                           torch.get_num_threads())


def output_error(d: torch.Tensor, H: torch.Tensor) -> float:
    """tr(d H d^T): the squared output error a weight error d [out, in] makes on inputs with E[x x^T] = H.

    The product runs in runtime.kernels.compute_dtype(): bf16 where the CPU has it in hardware (AMX tiles or AVX-512 bf16: 4-7x
    fp32), with fp32 accumulation inside the GEMM and a pairwise fp32 sum: within about 0.1% of the fp32 figure on
    a 1.5B down_proj, the same for every candidate a search compares (H is rounded once); elsewhere fp32. Pass H
    already converted (error_operand) to convert it once for many calls."""
    Hb = error_operand(H)
    return float((d.to(Hb.dtype) @ Hb).float().mul_(d).sum())  # torch's fp32 sum is pairwise


def error_operand(H: torch.Tensor) -> torch.Tensor:
    """H in the dtype the error products run in (runtime.kernels.compute_dtype: bf16 or fp32)."""
    from ..runtime.kernels import compute_dtype

    dt = compute_dtype()
    return H if H.dtype == dt else H.to(dt)


def pack_result(fmt, q: torch.Tensor, scale, mn, w: torch.Tensor, H: torch.Tensor | None = None,
                report: bool = True, **extra) -> QuantizedWeight:
    """report: measure the error (through H where given); False where the caller measures it itself."""
    out_f, in_f = w.shape
    qw = QuantizedWeight(fmt, q.reshape(out_f, in_f).to(torch.int16), scale.reshape(out_f, -1),
                         None if mn is None else mn.reshape(out_f, -1), **extra)
    if report:
        qw.error = weight_error(w, qw.dequantize(), H)
    return qw


def rel_error(rel: float) -> dict:
    """A relative weight MSE and its SQNR in dB, as every error report holds them."""
    return {"weight_rel_mse": rel, "sqnr_db": float(-10 * torch.log10(torch.tensor(max(rel, 1e-30))))}


def weight_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor | None = None) -> dict:
    """Relative weight error, SQNR in dB, and with a Hessian H = E[x x^T] the relative output error."""
    d = (w - wq).float()
    rel = float((d * d).sum(dtype=torch.float64) / w.float().square().sum(dtype=torch.float64).clamp_min(1e-30))
    err = rel_error(rel)
    if H is not None:
        Hb = error_operand(H)
        num, den = output_error(d, Hb), output_error(w.float(), Hb)
        err["output_sq_err"] = num
        err["output_rel_err"] = num / max(den, 1e-30)
    return err


def rtn(w: torch.Tensor, fmt: WeightFormat, H: torch.Tensor | None = None, report: bool = True) -> QuantizedWeight:
    """Round to nearest with min/max group parameters."""
    w = w.float()
    fmt.check_shape(tuple(w.shape))
    wg = grouped(w, fmt)
    scale, mn = minmax_params(wg, fmt)
    return pack_result(fmt, quantize_codes(wg, fmt, scale, mn), scale, mn, w, H, report)
