"""A preallocated KV cache in a float dtype, or int8/int4 codes with one scale and zero per (token, head) vector."""

from __future__ import annotations

import torch

from ..errors import FormatError
from ..formats.kv import KV_FORMATS, KVFormat

FLOAT_KV = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise FormatError(f"unknown KV-cache format {name!r}: choose one of {sorted(KV_FORMATS)}")
    return KV_FORMATS[name]


def quantize_vectors(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max codes over the last dimension: (uint8 codes, bf16 scale, bf16 zero)."""
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8).to(torch.bfloat16)
    zero = lo.to(torch.bfloat16)
    q = torch.clamp(torch.round((x - zero.float()) / scale.float()), 0, (1 << bits) - 1).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def dequantize_vectors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        q = torch.stack((q & 0x0F, q >> 4), -1).flatten(-2)
    return q.to(torch.bfloat16) * scale + zero


class KVCache:
    """Keys and values of every layer for up to `max_ctx` positions. Float keys are stored transposed,
    [layers, batch, kv_heads, head_dim, positions], so decode's q @ K^T reads them contiguously (a bf16 matmul
    against a transposed view costs 3x more here); values are [layers, batch, kv_heads, positions, head_dim]."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_ctx: int, fmt: str = "bf16"):
        self.format = kv_format(fmt)
        self.max_ctx = max_ctx
        shape = (n_layers, batch, n_kv_heads, max_ctx, head_dim)
        if fmt in FLOAT_KV:
            self.dtype = FLOAT_KV[fmt]
            self.k = torch.zeros(shape[:3] + (head_dim, max_ctx), dtype=self.dtype)
            self.v = torch.zeros(shape, dtype=self.dtype)
            self.bits = None
        else:
            self.bits = self.format.bits
            code_shape = shape[:-1] + (head_dim * self.bits // 8,)
            self.k, self.v = torch.zeros(code_shape, dtype=torch.uint8), torch.zeros(code_shape, dtype=torch.uint8)
            self.ks, self.kz, self.vs, self.vz = (torch.zeros(shape[:-1] + (1,), dtype=torch.bfloat16) for _ in range(4))

    @property
    def nbytes(self) -> int:
        parts = [self.k, self.v] + ([] if self.bits is None else [self.ks, self.kz, self.vs, self.vz])
        return sum(t.numel() * t.element_size() for t in parts)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, T, head_dim] at positions pos.. and return every cached position so far:
        keys transposed [batch, kv_heads, head_dim, S], values [batch, kv_heads, S, head_dim]."""
        end = pos + k.shape[2]
        if self.bits is None:
            kc, vc = self.k[layer], self.v[layer]
            kc[..., pos:end] = k.transpose(-1, -2)
            vc[:, :, pos:end] = v
            return kc[..., :end], vc[:, :, :end]
        for codes, s, z, x in ((self.k, self.ks, self.kz, k), (self.v, self.vs, self.vz, v)):
            q, scale, zero = quantize_vectors(x, self.bits)
            codes[layer, :, :, pos:end], s[layer, :, :, pos:end], z[layer, :, :, pos:end] = q, scale, zero
        return (dequantize_vectors(self.k[layer, :, :, :end], self.ks[layer, :, :, :end], self.kz[layer, :, :, :end],
                                   self.bits).transpose(-1, -2),
                dequantize_vectors(self.v[layer, :, :, :end], self.vs[layer, :, :, :end], self.vz[layer, :, :, :end], self.bits))
