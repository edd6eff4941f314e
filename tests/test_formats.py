import re

import gguf
import numpy as np
import pytest
import torch

from tightfit.errors import FormatError
from tightfit.formats import WeightFormat, pack, unpack
from tightfit.formats.ggml import to_ggml
from tightfit.formats.kv import KV_FORMATS
from tightfit.quant.core import QuantizedWeight, rtn

ALL = [WeightFormat(b, g, s) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 0) for s in (True, False)]


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_pack_unpack_is_exact(fmt):
    g = torch.Generator().manual_seed(fmt.bits)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (7, 576), generator=g, dtype=torch.int16)
    packed = pack(codes, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 576 * fmt.bits // 8)
    assert torch.equal(unpack(packed, fmt, 576), codes)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_rtn_error_within_half_a_step(fmt):
    w = torch.randn(16, 576) * 0.02
    qw = rtn(w, fmt)
    step = qw.scales.float().abs()[:, qw.column_groups()]
    # asymmetric: half a step (plus the fp16 rounding of the scale, over up to qmax steps); symmetric: the side
    # opposite the group's largest magnitude reaches one level less, so up to one step
    bound = (step if fmt.symmetric else step / 2) + step * fmt.qmax * 2.0 ** -10
    assert ((w - qw.dequantize()).abs() <= bound + 1e-7).all()
    assert qw.codes.min() >= fmt.qmin and qw.codes.max() <= fmt.qmax
    assert qw.error["sqnr_db"] > 5.5 * fmt.bits - 8  # ~6 dB per bit


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_fisher_loss_in_c_equals_the_torch_rounding(fmt, monkeypatch):
    """The sensitivities' sum F (w - RTN(w))^2 from quant.cpp equals rtn_error's, also through zero groups."""
    from tightfit.quant import core

    g = torch.Generator().manual_seed(fmt.bits)
    w = torch.randn(12, 512, generator=g) * 0.02
    w[3, :64] = 0  # whole groups of zeros
    F = torch.rand(12, 512, generator=g)
    d = core.rtn_error(w, fmt)
    want = float((F * d * d).sum(dtype=torch.float64))
    from tightfit.runtime import kernels

    assert kernels.quant_library() is not None
    assert core.fisher_loss(w, F, fmt) == pytest.approx(want, rel=1e-6)
    monkeypatch.setattr(kernels, "quant_library", lambda: None)  # the fallback without a compiler
    assert core.fisher_loss(w, F, fmt) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name,bpw", [("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0), ("Q8_0", 8.5)])
def test_ggml_exact_formats_copy_bit_exactly(name, bpw):
    fmt = next(f for f in ALL if f.group_size == 32 and f.ggml_type == name)
    assert fmt.bits_per_weight((64, 576)) == bpw
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert type_size * 8 / block_size == bpw  # the same size function as llama.cpp's own blocks
    qw = rtn(torch.randn(8, 576), fmt)
    ggml, raw = to_ggml(qw)
    assert ggml == name and raw.shape == (8, 576 // 32 * type_size)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    assert np.array_equal(theirs.reshape(8, 576), qw.dequantize().numpy())


def test_format_descriptions():
    f = WeightFormat(4, 32, False)
    assert f.name == "asym4-g32" and WeightFormat.parse("asym4-g32") == f
    assert WeightFormat.parse("sym8-pc") == WeightFormat(8, 0, True)
    assert WeightFormat(4, 32, True, "bfloat16").ggml_type is None  # torch-style bf16 scales copy to no GGML type
    assert WeightFormat(3, 64, False).nbytes((10, 576)) == 10 * (576 * 3 // 8 + 9 * 4)
    assert KV_FORMATS["int8"].bytes_per_token(30, 3, 64) == 2 * 30 * 3 * (64 + 4)


def test_bad_formats():
    with pytest.raises(FormatError, match=re.escape("unsupported bits 7: choose one of [2, 3, 4, 5, 6, 8]")):
        WeightFormat(7)
    with pytest.raises(FormatError, match="unsupported group size 48: choose one of 16, 32, 64, 128, or 0"):
        WeightFormat(4, 48)
    with pytest.raises(FormatError, match=re.escape("group size 128 does not divide q_proj's input dimension 576: "
                                                    "choose a group size that divides it (32, 64)")):
        WeightFormat(4, 128).check_shape((576, 576), "q_proj")
    with pytest.raises(FormatError, match="cannot read format name 'int4'"):
        WeightFormat.parse("int4")


@pytest.mark.parametrize("name", ["sym5-g32", "asym5-g32"])
def test_q5_blocks_read_back_to_the_codes_they_were_written_from(name):
    """Q5_0 / Q5_1 tensors of a GGUF run from their codes: the reader inverts the writer, and both agree with
    gguf-py's dequantizer bit for bit."""
    from tightfit.formats.ggml import from_q5_blocks, to_ggml

    g = torch.Generator().manual_seed(3)
    qw = rtn(torch.randn(16, 256, generator=g) * 0.03, WeightFormat.parse(name))
    ggml, raw = to_ggml(qw)
    codes, scales, mins = from_q5_blocks(raw, ggml, *qw.shape)
    assert np.array_equal(codes, qw.codes.numpy()) and np.array_equal(scales, qw.scales.numpy())
    assert (mins is None) == qw.fmt.symmetric and (mins is None or np.array_equal(mins, qw.mins.numpy()))
    back = QuantizedWeight(qw.fmt, torch.from_numpy(codes), torch.from_numpy(scales),
                           None if mins is None else torch.from_numpy(mins)).dequantize()
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[ggml]).reshape(qw.shape)
    assert np.array_equal(theirs, back.numpy())
