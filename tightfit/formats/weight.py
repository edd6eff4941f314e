"""Weight formats as data: integer group-wise affine codes, their scales/zeros, their size, and their packing.

One description serves the quantizers, the artifact writer, the runtime and the planner's memory model.

Conventions (q are the integer codes stored):
- symmetric ("sym"): q in [-2^(b-1), 2^(b-1) - 1], w = q * scale. The scale is the group's signed absmax
  divided by -2^(b-1), so the largest-magnitude weight lands exactly on the extra negative level (llama.cpp's
  Q4_0/Q5_0 trick); for 8 bits llama.cpp's Q8_0 uses absmax / 127 - both dequantize as q * d.
- asymmetric ("min"): q in [0, 2^b - 1], w = q * scale + min (llama.cpp's Q4_1/Q5_1: fp16 scale and min).
  torch's CPU int4 op reads w = (q - 8) * scale + zero with bf16 scale/zero: the same numbers with
  zero = min + 8 * scale (see to_torch_int4 in the runtime).
- super-blocks ("k", as llama.cpp's K-quants): groups of 32 whose scales (and mins) are themselves quantized, in
  super-blocks of 256 weights. Asymmetric: 6-bit scale and 6-bit min codes per group under one fp16 scale d and
  one fp16 dmin per super-block, scale = d * sc, min = -dmin * m (sc 1..63, m 0..63; mins are never positive);
  asym4-k32 is llama.cpp's Q4_K byte for byte (4.5 bpw), asym5-k32 its Q5_K. Symmetric: an int8 scale code per
  group under one fp16 d (sym6-k32 copies into Q6_K, whose 16-weight sub-blocks repeat each code).
  In memory a QuantizedWeight holds the effective scales (d * sc, exact in fp32); the artifact stores the codes.
- non-uniform grids ("nl", llama.cpp's IQ4_NL table): a 4-bit code is an index into 16 fixed int8 levels,
  denser near zero where weights are, w = d * level[q] (no min). nl4-g32 (fp16 d per 32: 4.5 bpw) is IQ4_NL byte
  for byte; nl4-k32 (a signed 6-bit code per 32 under one fp16 per 256: 4.25 bpw) is IQ4_XS. The table is
  llama.cpp's kvalues_iq4nl (ggml-common.h; ikawrakow, llama.cpp PR #5590), fitted to the weights of real models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128, 0)  # 0: one group per output row (per-channel); 16: Q6_K's sub-blocks
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SUPER_BLOCK = 256  # weights per super-block of the "k" formats (llama.cpp's QK_K)
SUPER_CODE_MAX = {False: 63, True: 127}  # largest scale code: 6 bits unsigned (asymmetric), int8 (symmetric)
NL_SUPER_CODE_MAX = 31  # nl4-k32: signed 6-bit scale codes, stored + 32 (IQ4_XS)
GRIDS = ("uniform", "nl")
NL4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL's levels

# formats whose codes and scales copy exactly into a GGML block type
GGML_EXACT = {(4, 32, True): "Q4_0", (4, 32, False): "Q4_1", (5, 32, True): "Q5_0", (5, 32, False): "Q5_1",
              (8, 32, True): "Q8_0"}
GGML_EXACT_SUPER = {(4, False): "Q4_K", (5, False): "Q5_K", (6, True): "Q6_K"}
GGML_EXACT_NL = {False: "IQ4_NL", True: "IQ4_XS"}  # nl4 with group 32: plain, super-block


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: int = 32  # 0 = per output channel
    symmetric: bool = False
    scale_dtype: str = "float16"
    superblock: bool = False  # scales (and mins) quantized in super-blocks of 256 weights ("k" formats)
    grid: str = "uniform"  # "nl": codes index NL4_LEVELS (4 bits, symmetric: no min)

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise FormatError(f"unknown grid {self.grid!r}: choose one of {list(GRIDS)}")
        if self.grid == "nl" and (self.bits != 4 or not self.symmetric):
            raise FormatError("the non-uniform grid has 4-bit codes and no min: 'nl4-g32' or 'nl4-k32'")
        if self.bits not in BITS:
            raise FormatError(f"unsupported bits {self.bits}: choose one of {list(BITS)}")
        if self.group_size not in GROUP_SIZES:
            raise FormatError(f"unsupported group size {self.group_size}: choose one of 16, 32, 64, 128, or 0 for "
                              "per-channel")
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"unsupported scale dtype {self.scale_dtype!r}: choose one of {list(SCALE_DTYPES)}")
        if self.superblock and (self.group_size not in (16, 32) or self.scale_dtype != "float16"):
            raise FormatError("super-block formats have groups of 32 (or 16) under fp16 super-scales: e.g. "
                              "'asym4-k32', 'sym6-k16'")
        if self.superblock and self.group_size == 16 and not (self.symmetric and self.grid == "uniform"):
            raise FormatError("groups of 16 under super-blocks take int8 scale codes and no min: 'sym6-k16' "
                              "(llama.cpp's Q6_K), not 'asym'/'nl'")

    @property
    def name(self) -> str:
        g = "pc" if self.group_size == 0 else f"{'k' if self.superblock else 'g'}{self.group_size}"
        s = "" if self.scale_dtype == "float16" else f"-{self.scale_dtype}"
        kind = "nl" if self.grid == "nl" else "sym" if self.symmetric else "asym"
        return f"{kind}{self.bits}-{g}{s}"

    @classmethod
    def parse(cls, name: str) -> WeightFormat:
        try:
            kind, g, *rest = name.split("-")
            nl, sym = kind.startswith("nl"), kind.startswith("sym")
            bits = int(kind[2:] if nl else kind[3:] if sym else kind[4:] if kind.startswith("asym") else "x")
            if g != "pc" and g[:1] not in ("g", "k"):
                raise ValueError(g)
            group = 0 if g == "pc" else int(g[1:])
            return cls(bits, group, sym or nl, rest[0] if rest else "float16", g.startswith("k"),
                       "nl" if nl else "uniform")
        except FormatError:  # a name read, naming a format that does not exist: its own message
            raise
        except (ValueError, IndexError) as e:
            raise FormatError(f"cannot read format name {name!r}: expected e.g. 'asym4-g32', 'asym4-k32', "
                              "'nl4-k32' or 'sym8-pc'") from e

    @property
    def qmin(self) -> int:
        """The smallest code (an nl format's codes are indices 0..15)."""
        return -(1 << (self.bits - 1)) if self.symmetric and self.grid == "uniform" else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric and self.grid == "uniform" else (1 << self.bits) - 1

    @property
    def levels(self) -> torch.Tensor | None:
        """The value of each code of a non-uniform grid (fp32, ascending), None for a uniform one."""
        return torch.tensor(NL4_LEVELS, dtype=torch.float32) if self.grid == "nl" else None

    @property
    def low_level(self) -> int:
        """A symmetric format's most negative level, where the group's largest-magnitude weight lands."""
        return NL4_LEVELS[0] if self.grid == "nl" else self.qmin

    @property
    def super_code_max(self) -> int:
        return NL_SUPER_CODE_MAX if self.grid == "nl" else SUPER_CODE_MAX[self.symmetric]

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> the levels they stand for, fp32 (the codes themselves on a uniform grid)."""
        return self.levels[codes.long()] if self.grid == "nl" else codes.float()

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == 0 else self.group_size

    def check_shape(self, shape: tuple[int, int], name: str = "tensor") -> None:
        out_f, in_f = shape
        if self.group_size and in_f % self.group_size:
            raise FormatError(
                f"group size {self.group_size} does not divide {name}'s input dimension {in_f}: choose a group size "
                f"that divides it ({', '.join(str(g) for g in (32, 64, 128) if in_f % g == 0) or 'per-channel'})"
            )
        if self.superblock and in_f % SUPER_BLOCK:
            raise FormatError(
                f"{self.name} needs rows of a multiple of {SUPER_BLOCK} weights (its super-blocks); {name}'s input "
                f"dimension is {in_f}: use {self.for_shape(shape).name} for it (llama.cpp's K-quants fall back likewise)")
        if (in_f * self.bits) % 8:
            raise FormatError(f"{name}: {in_f} codes of {self.bits} bits do not fill whole bytes per row")

    def fits(self, shape: tuple[int, int]) -> bool:
        try:
            self.check_shape(shape)
        except FormatError:
            return False
        return True

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Every stored byte of a tensor in this format: codes, scales, and mins for asymmetric formats."""
        out_f, in_f = shape
        if self.superblock:  # per group: 8-bit (sym), 6-bit (nl) or 2 x 6-bit (asym) codes; per 256: fp16 d (, dmin)
            code_bits = 6 if self.grid == "nl" else 8 if self.symmetric else 12
            supers = in_f // SUPER_BLOCK * (1 if self.symmetric else 2) * 2
            return out_f * (in_f * self.bits // 8 + self.groups(in_f) * code_bits // 8 + supers)
        scale_bytes = torch.finfo(self.scale_torch_dtype).bits // 8
        per_group = scale_bytes * (1 if self.symmetric else 2)
        return out_f * (in_f * self.bits // 8 + self.groups(in_f) * per_group)

    def flat(self) -> WeightFormat:
        """The same codes with a plain fp16 scale (and min) per group: what a super-block format becomes on a
        tensor whose rows are not a multiple of 256, and what the runtime's kernels hold."""
        return WeightFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype, grid=self.grid) \
            if self.superblock else self

    def for_shape(self, shape: tuple[int, int]) -> WeightFormat:
        """self, or flat() where the rows do not fill whole super-blocks (groups of 16 then become 32, the
        kernels' smallest plain group)."""
        if not self.superblock or shape[1] % SUPER_BLOCK == 0:
            return self
        flat = self.flat()
        return WeightFormat(flat.bits, 32, flat.symmetric, flat.scale_dtype, grid=flat.grid) if flat.group_size == 16 \
            else flat

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return self.nbytes(shape) * 8 / (shape[0] * shape[1])

    @property
    def ggml_type(self) -> str | None:
        """The GGML block type this format copies into exactly, if any (fp16 scales, group 32)."""
        if self.scale_dtype != "float16":
            return None
        if self.grid == "nl":
            return GGML_EXACT_NL[self.superblock] if self.group_size == 32 else None
        if self.superblock:
            return GGML_EXACT_SUPER.get((self.bits, self.symmetric))
        return GGML_EXACT.get((self.bits, self.group_size, self.symmetric))


# ---- packing: codes are stored as a little-endian bit stream per row, `bits` bits per code ----

def pack(codes: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """[out, in] integer codes in [qmin, qmax] -> [out, in * bits / 8] uint8."""
    if fmt.bits in (2, 4, 8):  # whole codes per byte: shifts, no bit matrix (8x the codes' memory)
        u = (codes.to(torch.int16) - fmt.qmin).to(torch.uint8)
        per = 8 // fmt.bits
        u = u.reshape(u.shape[0], -1, per)
        out = u[..., 0].clone()
        for j in range(1, per):
            out |= u[..., j] << (j * fmt.bits)
        return out
    q = (codes.to(torch.int32) - fmt.qmin).numpy().astype(np.uint8)
    bits = (q[..., None] >> np.arange(fmt.bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bits.reshape(q.shape[0], -1), axis=-1, bitorder="little"))


def unpack(packed: torch.Tensor, fmt: WeightFormat, in_features: int) -> torch.Tensor:
    """Inverse of pack: uint8 [out, in * bits / 8] -> int16 codes [out, in]."""
    if fmt.bits in (2, 4, 8):
        per, mask = 8 // fmt.bits, (1 << fmt.bits) - 1
        parts = [(packed >> (j * fmt.bits)) & mask for j in range(per)]
        q = torch.stack(parts, -1).reshape(packed.shape[0], -1)[:, :in_features]
        return q.to(torch.int16) + fmt.qmin
    bits = np.unpackbits(packed.numpy(), axis=-1, bitorder="little")[:, : in_features * fmt.bits]
    bits = bits.reshape(packed.shape[0], in_features, fmt.bits).astype(np.int16)
    q = (bits << np.arange(fmt.bits, dtype=np.int16)).sum(-1, dtype=np.int16)
    return torch.from_numpy(q) + fmt.qmin



# ---- super-block scales: effective per-group values in memory, codes under fp16 super-scales on disk ----

_CODES6 = WeightFormat(6, 32, False)  # 6-bit unsigned scale/min codes, packed as a bit stream per row


def super_codes(scales: torch.Tensor, mins: torch.Tensor | None, fmt: WeightFormat):
    """(d [rows, supers] fp16, scale codes [rows, groups], dmin, min codes) of a super-block format's effective
    scales (and mins, asymmetric). They are exact by construction (quant.core.snap_superblock gives each
    super-block's largest scale the largest code, so d = that scale / the code, exactly); anything else is refused."""
    rows, groups = scales.shape
    per = SUPER_BLOCK // fmt.group_size
    top = fmt.super_code_max
    # signed codes span [-(top + 1), top]: tightfit's quantizer gives the largest scale the code top, llama.cpp's
    # Q6_K and IQ4_XS give it -(top + 1) (d = -max / 128, negative where the max is positive), so each is tried,
    # per super-block
    signed = fmt.symmetric

    def split(v: torch.Tensor):
        v = v.float().reshape(rows, groups // per, per)
        low = -(top + 1) if signed else 0
        amax = v.abs().amax(-1)
        found = None
        for t in ((top, top + 1, -(top + 1)) if signed else (top,)):  # -: llama.cpp's d < 0 (a positive max)
            d = amax / t
            live = amax > 2.0**-24
            d = torch.where(live, d, 0.0)
            codes = torch.where(live[..., None], torch.round(v / torch.where(live, d, 1.0)[..., None]), 0.0)
            ok = ((d.half().float() == d) & (d[..., None] * codes == v).all(-1)
                  & ((codes >= low) & (codes <= top)).all(-1))
            if found is None:
                found = (d, codes, ok)
            else:
                d0, c0, ok0 = found
                use = ~ok0 & ok
                found = (torch.where(use, d, d0), torch.where(use[..., None], codes, c0), ok0 | ok)
        d, codes, ok = found
        if not bool(ok.all()):
            raise FormatError(f"{fmt.name}: these scales are not fp16 super-scales times integer codes (they were "
                              "not made by the super-block quantizer); quantize the tensor again")
        return d.half(), codes.reshape(rows, groups).to(torch.int16)

    d, sc = split(scales)
    if fmt.symmetric:
        return d, sc, None, None
    signed = False
    dmin, m = split(-mins.float())
    return d, sc, dmin, m


def encode_scales(scales: torch.Tensor, mins: torch.Tensor | None, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """What the artifact stores of a super-block format's scales: "scales" (6-bit codes packed, or int8 for
    symmetric), "mins" (6-bit codes packed), "super" (fp16 d, or [d, dmin] per super-block)."""
    d, sc, dmin, m = super_codes(scales, mins, fmt)
    if fmt.grid == "nl":
        return {"scales": pack(sc + NL_SUPER_CODE_MAX + 1, _CODES6), "super": d.contiguous()}
    if fmt.symmetric:
        return {"scales": sc.to(torch.int8).contiguous(), "super": d.contiguous()}
    return {"scales": pack(sc, _CODES6), "mins": pack(m, _CODES6), "super": torch.stack((d, dmin), -1).contiguous()}


def decode_scales(stored: dict[str, torch.Tensor | None], fmt: WeightFormat, shape: tuple[int, int]):
    """encode_scales' inverse: -> effective scales, mins (fp32 [rows, groups]); FormatError on any shape mismatch."""
    rows, in_f = shape
    groups, supers = fmt.groups(in_f), in_f // SUPER_BLOCK
    per = SUPER_BLOCK // fmt.group_size
    want = {"scales": ((rows, groups * 6 // 8), torch.uint8), "super": ((rows, supers), torch.float16)} \
        if fmt.grid == "nl" else \
        {"scales": ((rows, groups), torch.int8), "super": ((rows, supers), torch.float16)} if fmt.symmetric else \
        {"scales": ((rows, groups * 6 // 8), torch.uint8), "mins": ((rows, groups * 6 // 8), torch.uint8),
         "super": ((rows, supers, 2), torch.float16)}
    for key, (shp, dtype) in want.items():
        t = stored.get(key)
        if t is None or tuple(t.shape) != shp or t.dtype != dtype:
            got = "nothing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            raise FormatError(f"{fmt.name} {list(shape)}: its {key} should be {str(dtype).removeprefix('torch.')} "
                              f"{list(shp)}, found {got}")
    sup = stored["super"].float()
    if fmt.grid == "nl":
        sc = unpack(stored["scales"], _CODES6, groups).float().reshape(rows, supers, per) - (NL_SUPER_CODE_MAX + 1)
        return (sup[..., None] * sc).reshape(rows, groups), None
    if fmt.symmetric:
        sc = stored["scales"].float().reshape(rows, supers, per)
        return (sup[..., None] * sc).reshape(rows, groups), None
    sc = unpack(stored["scales"], _CODES6, groups).float().reshape(rows, supers, per)
    m = unpack(stored["mins"], _CODES6, groups).float().reshape(rows, supers, per)
    return (sup[..., 0:1] * sc).reshape(rows, groups), (-(sup[..., 1:2] * m)).reshape(rows, groups)
