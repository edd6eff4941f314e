"""Weight formats as data: integer group-wise affine codes, their scales/zeros, their size, and their packing.

One description serves the quantizers, the artifact writer, the runtime and the planner's memory model.

Conventions (q are the integer codes stored):
- symmetric ("sym"): q in [-2^(b-1), 2^(b-1) - 1], w = q * scale. The scale is the group's signed absmax
  divided by -2^(b-1), so the largest-magnitude weight lands exactly on the extra negative level (llama.cpp's
  Q4_0/Q5_0 trick); for 8 bits llama.cpp's Q8_0 uses absmax / 127 - both dequantize as q * d.
- asymmetric ("min"): q in [0, 2^b - 1], w = q * scale + min (llama.cpp's Q4_1/Q5_1: fp16 scale and min).
  torch's CPU int4 op reads w = (q - 8) * scale + zero with bf16 scale/zero: the same numbers with
  zero = min + 8 * scale (see to_torch_int4 in the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, 0)  # 0: one group per output row (per-channel)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# formats whose codes and scales copy exactly into a GGML block type
GGML_EXACT = {(4, 32, True): "Q4_0", (4, 32, False): "Q4_1", (5, 32, True): "Q5_0", (5, 32, False): "Q5_1",
              (8, 32, True): "Q8_0"}


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: int = 32  # 0 = per output channel
    symmetric: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.bits not in BITS:
            raise FormatError(f"unsupported bits {self.bits}: choose one of {list(BITS)}")
        if self.group_size not in GROUP_SIZES:
            raise FormatError(f"unsupported group size {self.group_size}: choose one of 32, 64, 128, or 0 for "
                              "per-channel")
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"unsupported scale dtype {self.scale_dtype!r}: choose one of {list(SCALE_DTYPES)}")

    @property
    def name(self) -> str:
        g = "pc" if self.group_size == 0 else f"g{self.group_size}"
        s = "" if self.scale_dtype == "float16" else f"-{self.scale_dtype}"
        return f"{'sym' if self.symmetric else 'asym'}{self.bits}-{g}{s}"

    @classmethod
    def parse(cls, name: str) -> WeightFormat:
        try:
            kind, g, *rest = name.split("-")
            sym = kind.startswith("sym")
            bits = int(kind[3:] if sym else kind[4:])
            group = 0 if g == "pc" else int(g[1:])
            return cls(bits, group, sym, rest[0] if rest else "float16")
        except (ValueError, IndexError) as e:
            raise FormatError(f"cannot read format name {name!r}: expected e.g. 'asym4-g32' or 'sym8-pc'") from e

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

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
        if (in_f * self.bits) % 8:
            raise FormatError(f"{name}: {in_f} codes of {self.bits} bits do not fill whole bytes per row")

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Every stored byte of a tensor in this format: codes, scales, and mins for asymmetric formats."""
        out_f, in_f = shape
        scale_bytes = torch.finfo(self.scale_torch_dtype).bits // 8
        per_group = scale_bytes * (1 if self.symmetric else 2)
        return out_f * (in_f * self.bits // 8 + self.groups(in_f) * per_group)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return self.nbytes(shape) * 8 / (shape[0] * shape[1])

    @property
    def ggml_type(self) -> str | None:
        """The GGML block type this format copies into exactly, if any (fp16 scales, group 32)."""
        if self.scale_dtype != "float16":
            return None
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

