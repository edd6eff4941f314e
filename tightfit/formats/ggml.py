"""Exact copies of tightfit formats into GGML block types (llama.cpp's ggml-common.h layouts).

Q4_0: fp16 d, 16 bytes: byte j holds q[j] (low nibble) and q[j+16] (high), q stored + 8;  w = (q - 8) d.
Q4_1: fp16 d, fp16 m, 16 nibble bytes as Q4_0;                                            w = q d + m.
Q5_0: fp16 d, 4 bytes qh (bit j = bit 4 of q[j]), 16 nibble bytes of the low 4 bits, q + 16; w = (q - 16) d.
Q5_1: fp16 d, fp16 m, qh, nibbles;                                                         w = q d + m.
Q8_0: fp16 d, 32 int8;                                                                      w = q d.
Super-blocks of 256 (the K-quants; ggml-common.h, dequantize_row_q*_K in ggml-quants.c):
Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scale and min codes for 8 groups of 32, 128 bytes of nibbles (each
      32 bytes hold groups 2i (low nibbles) and 2i+1 (high));                              w = d sc q - dmin m.
Q5_K: as Q4_K plus 32 bytes qh before the nibbles (bit 2i / 2i+1 of qh[l]: bit 4 of element l of group 2i / 2i+1).
Q6_K: 128 bytes of low nibbles, 64 bytes of the high 2 bits, 16 int8 scales (one per 16 weights), fp16 d;
      w = d sc (q - 32): sym6-k16 byte for byte (per half of 128: ql[l] holds runs 0 and 2 of 32 at l, ql[32 + l]
      runs 1 and 3, qh[l] the high bits of all four at bit 2r).
Non-uniform 4-bit (codes index the 16 levels of kvalues_iq4nl):
IQ4_NL: fp16 d, 16 nibble bytes as Q4_0 (no offset: the nibble is the index);            w = d level[q].
IQ4_XS: per 256: fp16 d, u16 scales_h (2 high bits of group g at bits 2g), 4 bytes scales_l (low 4 bits, group
        2i in the low nibble of byte i, 2i+1 in the high), 128 nibble bytes, 16 per group as Q4_0;
        w = d (ls - 32) level[q] with ls the 6-bit code.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FormatError


def _nibbles(q: np.ndarray) -> np.ndarray:  # [blocks, 32] in 0..15 -> [blocks, 16]
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _qh(q: np.ndarray) -> np.ndarray:  # bit 4 of each of 32 codes -> 4 bytes, little-endian
    bits = ((q >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16(x) -> np.ndarray:
    return x.reshape(-1, 1).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit codes [blocks, 8] of scales and mins -> Q4_K/Q5_K's 12 bytes (get_scale_min_k4's inverse): bytes 0-3
    scale codes 0-3, bytes 4-7 min codes 0-3, each with 2 high bits of codes 4-7 on top; bytes 8-11 their low
    nibbles (scale | min << 4)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _k_blocks(qw, ggml: str) -> np.ndarray:
    from .weight import super_codes

    d, sc, dmin, m = (None if t is None else t.numpy() for t in super_codes(qw.scales, qw.mins, qw.fmt))
    u = (qw.codes.numpy().astype(np.int32) - qw.fmt.qmin).reshape(-1, 256)  # unsigned codes per super-block
    d = _f16(d)
    if ggml == "IQ4_XS":
        ls = (sc.reshape(-1, 8).astype(np.int32) + 32).astype(np.uint16)
        high = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        low = (ls & 0xF).astype(np.uint8).reshape(-1, 4, 2)
        scales_l = low[:, :, 0] | (low[:, :, 1] << 4)
        qs = _nibbles(u.reshape(-1, 32)).reshape(-1, 128)
        return np.concatenate([d, high.astype("<u2").view(np.uint8).reshape(-1, 2), scales_l, qs], axis=1)
    if ggml == "Q6_K":
        c = u.reshape(-1, 2, 4, 32)  # two halves of 128, each four runs of 32
        ql = np.concatenate([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                             (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
        hi = c >> 4
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
        per = 256 // qw.fmt.group_size  # sym6-k16 holds Q6_K's 16 codes; sym6-k32's 8 each cover two sub-blocks
        scales = np.repeat(sc.reshape(-1, per), 16 // per, axis=1).astype(np.int8).view(np.uint8)
        return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), scales, d], axis=1)
    c = u.reshape(-1, 4, 2, 32)  # four pairs of groups
    qs = ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)
    parts = [d, _f16(dmin), _k_scales(sc.reshape(-1, 8).astype(np.uint8), m.reshape(-1, 8).astype(np.uint8))]
    if ggml == "Q5_K":
        hi = (c >> 4).astype(np.uint8)  # [blocks, pair, 2, 32]
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
        parts.append((hi << shifts[None, :, :, None]).sum((1, 2), dtype=np.uint8))
    return np.concatenate(parts + [qs], axis=1)


def to_ggml(qw) -> tuple[str, np.ndarray]:
    """(GGML type name, raw bytes [rows, row_bytes]) holding exactly the codes and scales of QuantizedWeight qw."""
    ggml = qw.fmt.ggml_type
    if ggml is None or qw.g_idx is not None:
        raise FormatError(f"format {qw.fmt.name}{' with g_idx' if qw.g_idx is not None else ''} has no exact GGML "
                          "type; re-quantize it to one")
    out_f, in_f = qw.shape
    if qw.fmt.superblock:
        return ggml, np.ascontiguousarray(_k_blocks(qw, ggml)).reshape(out_f, -1)
    q = qw.codes.numpy().astype(np.int32).reshape(-1, 32)
    d = _f16(qw.scales.float().numpy())
    if ggml == "Q8_0":
        blocks = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
    elif ggml == "IQ4_NL":
        blocks = np.concatenate([d, _nibbles(q)], axis=1)
    elif ggml in ("Q4_0", "Q5_0"):
        u = q - qw.fmt.qmin  # stored offset: + 8 or + 16
        parts = [d] + ([_qh(u)] if ggml == "Q5_0" else []) + [_nibbles(u & 0xF)]
        blocks = np.concatenate(parts, axis=1)
    else:  # Q4_1, Q5_1
        m = _f16(qw.mins.float().numpy())
        parts = [d, m] + ([_qh(q)] if ggml == "Q5_1" else []) + [_nibbles(q & 0xF)]
        blocks = np.concatenate(parts, axis=1)
    return ggml, np.ascontiguousarray(blocks).reshape(out_f, -1)


def from_k_blocks(raw: np.ndarray, ggml: str, rows: int, cols: int):
    """Q4_K / Q5_K blocks (bytes [rows, cols / 256 * block bytes]) -> (codes int16 [rows, cols], effective scales,
    effective mins: fp32 [rows, cols / 32]), exactly: scale = d * sc and min = -dmin * m, as ggml dequantizes."""
    size = {"Q4_K": 144, "Q5_K": 176}[ggml]
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    d16, dmin16, sc, m = _k_header(b)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    qs = b[:, size - 128:].reshape(-1, 4, 32).astype(np.int16)
    u = np.stack([qs & 0xF, qs >> 4], axis=2)  # [blocks, pair, 2, 32]
    if ggml == "Q5_K":
        qh = b[:, 16:48].astype(np.int16)  # bit g of qh[l]: bit 4 of element l of group g
        g = np.arange(8, dtype=np.int16).reshape(4, 2)
        u = u | (((qh[:, None, None, :] >> g[None, :, :, None]) & 1) << 4)
    groups = cols // 32
    scales = (d * sc.astype(np.float32)).reshape(rows, groups)
    mins = -(dmin * m.astype(np.float32)).reshape(rows, groups)
    return u.reshape(rows, cols), scales, mins


def _k_header(b: np.ndarray):
    """Q4_K / Q5_K blocks' header (bytes [blocks, size]) -> d, dmin (fp16 [blocks, 1]), the 6-bit scale and min
    codes (int32 [blocks, 8])."""
    d = b[:, 0:2].copy().view(np.float16)
    dmin = b[:, 2:4].copy().view(np.float16)
    q = b[:, 4:16].astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return d, dmin, sc, m


def super_scales(raw: np.ndarray, ggml: str, rows: int, cols: int):
    """A K-quant tensor's own super-block scales, as the runtime's kernel holds them: (d fp16 [rows, cols / 256],
    scale codes int16 [rows, groups], dmin fp16 or None, min codes int16 or None), groups of 32 (Q4_K, Q5_K; ggml
    subtracts dmin * min code) or 16 (Q6_K, int8 codes). Read from the blocks' headers, where recovering them from
    the effective scales (formats.weight.super_codes) took 10 s of a 1.5B Q4_K_M file's load."""
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[ggml]
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    if ggml == "Q6_K":
        sc = b[:, 192:208].view(np.int8).astype(np.int16).reshape(rows, cols // 16)
        return torch.from_numpy(b[:, 208:210].copy().view(np.float16).reshape(rows, -1)), torch.from_numpy(sc), \
            None, None
    d, dmin, sc, m = _k_header(b)
    return (torch.from_numpy(d.reshape(rows, -1)), torch.from_numpy(sc.astype(np.int16).reshape(rows, -1)),
            torch.from_numpy(dmin.reshape(rows, -1)), torch.from_numpy(m.astype(np.int16).reshape(rows, -1)))


def from_q6_blocks(raw: np.ndarray, rows: int, cols: int):
    """Q6_K blocks -> (codes int16 [rows, cols] in -32..31, effective scales fp32 [rows, cols / 16]: d * sc), exactly
    as ggml dequantizes them (sym6-k16's codes)."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 64).astype(np.int16)  # per half of 128: 64 bytes, runs 0/2 and 1/3
    qh = b[:, 128:192].reshape(-1, 2, 32).astype(np.int16)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    low = [ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    u = np.stack([low[r] | (((qh >> (2 * r)) & 3) << 4) for r in range(4)], axis=2)  # [blocks, half, run, 32]
    return (u - 32).reshape(rows, cols), (d * sc).reshape(rows, cols // 16)


def from_iq4_blocks(raw: np.ndarray, ggml: str, rows: int, cols: int):
    """IQ4_NL / IQ4_XS blocks -> (codes: level indices int16 [rows, cols], effective scales fp32 [rows, cols / 32]),
    exactly as ggml dequantizes them (IQ4_XS: d * (ls - 32), ls any 6-bit code, -32 included)."""
    size = {"IQ4_NL": 18, "IQ4_XS": 136}[ggml]
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    qs = b[:, size - (16 if ggml == "IQ4_NL" else 128):].reshape(-1, 16).astype(np.int16)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # per group of 32: low nibbles first
    if ggml == "IQ4_NL":
        return codes.reshape(rows, cols), d.reshape(rows, cols // 32)
    high = b[:, 2:4].copy().view("<u2").astype(np.int32)  # [blocks, 1]
    low = b[:, 4:8].astype(np.int32)
    g = np.arange(8)
    ls = ((low[:, g // 2] >> (4 * (g % 2))) & 0xF) | (((high >> (2 * g)) & 3) << 4)
    return codes.reshape(rows, cols), (d * (ls - 32).astype(np.float32)).reshape(rows, cols // 32)


def from_q5_blocks(raw: np.ndarray, ggml: str, rows: int, cols: int):
    """Q5_0 / Q5_1 blocks -> (codes int16 [rows, cols], scales fp16 [rows, cols / 32], mins fp16 or None), exactly
    as ggml dequantizes them: Q5_0 w = (x - 16) d (sym5-g32's codes x - 16), Q5_1 w = x d + m (asym5-g32), x the
    5-bit value whose low nibble is in qs (low nibbles: elements 0-15, high: 16-31) and bit 4 bit j of qh."""
    size = {"Q5_0": 22, "Q5_1": 24}[ggml]
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    d = b[:, 0:2].copy().view(np.float16)
    at = 2 if ggml == "Q5_0" else 4
    qh = b[:, at:at + 4].copy().view("<u4").astype(np.int64)  # [blocks, 1]
    qs = b[:, at + 4:].astype(np.int16)
    x = np.concatenate([qs & 0xF, qs >> 4], axis=1) | (((qh >> np.arange(32)) & 1) << 4).astype(np.int16)
    groups = cols // 32
    if ggml == "Q5_0":
        return (x - 16).reshape(rows, cols), d.reshape(rows, groups), None
    m = b[:, 2:4].copy().view(np.float16)
    return x.reshape(rows, cols), d.reshape(rows, groups), m.reshape(rows, groups)
