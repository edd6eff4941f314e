"""Exact copies of tightfit formats into GGML block types (llama.cpp's ggml-common.h layouts).

Q4_0: fp16 d, 16 bytes: byte j holds q[j] (low nibble) and q[j+16] (high), q stored + 8;  w = (q - 8) d.
Q4_1: fp16 d, fp16 m, 16 nibble bytes as Q4_0;                                            w = q d + m.
Q5_0: fp16 d, 4 bytes qh (bit j = bit 4 of q[j]), 16 nibble bytes of the low 4 bits, q + 16; w = (q - 16) d.
Q5_1: fp16 d, fp16 m, qh, nibbles;                                                         w = q d + m.
Q8_0: fp16 d, 32 int8;                                                                      w = q d.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError


def _nibbles(q: np.ndarray) -> np.ndarray:  # [blocks, 32] in 0..15 -> [blocks, 16]
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _qh(q: np.ndarray) -> np.ndarray:  # bit 4 of each of 32 codes -> 4 bytes, little-endian
    bits = ((q >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16(x) -> np.ndarray:
    return x.reshape(-1, 1).astype(np.float16).view(np.uint8).reshape(-1, 2)


def to_ggml(qw) -> tuple[str, np.ndarray]:
    """(GGML type name, raw bytes [rows, row_bytes]) holding exactly the codes and scales of QuantizedWeight qw."""
    ggml = qw.fmt.ggml_type
    if ggml is None or qw.g_idx is not None:
        raise FormatError(f"format {qw.fmt.name}{' with g_idx' if qw.g_idx is not None else ''} has no exact GGML "
                          "type; re-quantize it to one")
    out_f, in_f = qw.shape
    q = qw.codes.numpy().astype(np.int32).reshape(-1, 32)
    d = _f16(qw.scales.float().numpy())
    if ggml == "Q8_0":
        blocks = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
    elif ggml in ("Q4_0", "Q5_0"):
        u = q - qw.fmt.qmin  # stored offset: + 8 or + 16
        parts = [d] + ([_qh(u)] if ggml == "Q5_0" else []) + [_nibbles(u & 0xF)]
        blocks = np.concatenate(parts, axis=1)
    else:  # Q4_1, Q5_1
        m = _f16(qw.mins.float().numpy())
        parts = [d, m] + ([_qh(q)] if ggml == "Q5_1" else []) + [_nibbles(q & 0xF)]
        blocks = np.concatenate(parts, axis=1)
    return ggml, np.ascontiguousarray(blocks).reshape(out_f, -1)
