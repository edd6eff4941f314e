"""Non-uniform 4-bit grids (nl4: codes index IQ4_NL's 16 levels): sizes and names, exact GGML blocks read back by
gguf-py, quality floors against the uniform grid at equal bits, the compiled loops against torch's, the runtime's
table-lookup kernel against the dequantized weight, and a model through artifact, runtime and both exporters."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tightfit.errors import FormatError
from tightfit.formats.ggml import from_iq4_blocks, to_ggml
from tightfit.formats.weight import NL4_LEVELS, WeightFormat, decode_scales, encode_scales
from tightfit.quant.core import QuantizedWeight, nearest_level, rtn

from .test_superblock import build_wide, student_t

NL = ["nl4-g32", "nl4-k32"]


def test_names_sizes_and_ggml_types():
    g, k = WeightFormat.parse("nl4-g32"), WeightFormat.parse("nl4-k32")
    assert (g.name, g.ggml_type, g.bits_per_weight((8, 512))) == ("nl4-g32", "IQ4_NL", 4.5)
    assert (k.name, k.ggml_type, k.bits_per_weight((8, 512))) == ("nl4-k32", "IQ4_XS", 4.25)
    assert k.flat() == g and k.for_shape((8, 288)) == g
    assert WeightFormat.parse("nl4-g64").ggml_type is None and WeightFormat.parse("nl4-g64").name == "nl4-g64"
    assert torch.equal(g.code_values(torch.arange(16)), torch.tensor(NL4_LEVELS, dtype=torch.float32))
    with pytest.raises(FormatError, match="the non-uniform grid has 4-bit codes and no min: 'nl4-g32' or 'nl4-k32'"):
        WeightFormat.parse("nl3-g32")
    with pytest.raises(FormatError, match="cannot read format name 'nlx-g32'"):
        WeightFormat.parse("nlx-g32")


def test_nearest_level_ties_go_down_and_ends_clamp():
    lv = torch.tensor(NL4_LEVELS, dtype=torch.float32)
    v = torch.tensor([-1000.0, -127.0, (-127 - 104) / 2, -115.0, 0.0, 113.0, 1e9])
    assert nearest_level(v, lv).tolist() == [0, 0, 0, 1, 8, 15, 15]


@pytest.mark.parametrize("name", NL)
def test_ggml_blocks_dequantize_in_gguf_py_to_our_weights_and_read_back(name):
    fmt = WeightFormat.parse(name)
    qw = rtn(student_t(seed=1), fmt)
    ggml, raw = to_ggml(qw)
    qtype = gguf.GGMLQuantizationType[ggml]
    assert ggml == fmt.ggml_type and raw.shape == (64, 512 // gguf.GGML_QUANT_SIZES[qtype][0]
                                                   * gguf.GGML_QUANT_SIZES[qtype][1])
    assert raw.size == fmt.nbytes(qw.shape)  # the size function counts exactly the bytes llama.cpp reads
    back = gguf.quants.dequantize(raw, qtype).reshape(qw.shape)
    assert np.array_equal(back, qw.dequantize().numpy())
    codes, scales = from_iq4_blocks(raw, ggml, *qw.shape)
    assert np.array_equal(codes, qw.codes.numpy()) and np.array_equal(scales, qw.scales.float().numpy())


def test_super_block_scale_codes_store_in_six_bits_and_refuse_foreign_scales():
    fmt = WeightFormat.parse("nl4-k32")
    qw = rtn(student_t(), fmt)
    stored = encode_scales(qw.scales, qw.mins, fmt)
    assert stored["scales"].dtype == torch.uint8 and stored["scales"].shape == (64, 16 * 6 // 8)
    scales, mins = decode_scales(stored, fmt, qw.shape)
    assert mins is None and torch.equal(scales, qw.scales.float())
    with pytest.raises(FormatError, match="not fp16 super-scales times integer codes"):
        encode_scales(rtn(student_t(), fmt.flat()).scales, None, fmt)


def test_the_grid_beats_the_uniform_one_at_equal_bits():
    """Heavy-tailed weights (student-t, as trained weights are): IQ4_NL's levels, dense near zero, against the
    uniform symmetric grid of the same 4.5 bpw, and IQ4_XS's 4.25 bpw against both."""
    w = student_t(128, 1024, seed=2)
    sym = rtn(w, WeightFormat.parse("sym4-g32")).error["sqnr_db"]
    nl = rtn(w, WeightFormat.parse("nl4-g32")).error["sqnr_db"]
    nlk = rtn(w, WeightFormat.parse("nl4-k32")).error["sqnr_db"]
    assert nl > sym + 0.5, (nl, sym)
    assert nlk > sym, (nlk, sym)  # 0.25 bpw less and still better


@pytest.mark.parametrize("name", NL)
def test_compiled_gptq_and_clip_search_equal_the_torch_loops_on_the_grid(monkeypatch, name):
    import tightfit.quant.core as core
    from tightfit.quant.gptq import gptq, gptq_errors
    from tightfit.runtime import kernels

    if kernels.quant_library() is None:
        pytest.skip("no C++ compiler here: only the torch loops run")
    fmt = WeightFormat.parse(name)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512**0.5)
    H = X.T @ X / 2048
    w = student_t(96, 512, seed=3)
    compiled = gptq(w, H, fmt)
    errs = gptq_errors(w, H, [fmt, WeightFormat.parse("sym4-g32")])
    monkeypatch.setattr(kernels, "quant_library", lambda: None)
    looped = gptq(w, H, fmt)
    assert torch.equal(compiled.codes, looped.codes) and torch.equal(compiled.scales, looped.scales)
    assert gptq_errors(w, H, [fmt, WeightFormat.parse("sym4-g32")]) == pytest.approx(errs, rel=1e-5)
    # GPTQ on the grid lowers the output error below round-to-nearest's, and below the uniform grid's
    assert compiled.error["output_rel_err"] < 0.9 * rtn(w, fmt, H).error["output_rel_err"]
    assert errs[0] < errs[1]
    assert compiled.codes.min() >= 0 and compiled.codes.max() <= 15


@pytest.mark.parametrize("name", NL)
def test_runtime_kernel_multiplies_by_the_table_weight(name):
    """tightfit's kernel (levels through a 16-byte table, activations int8 per 32) and torch's int4 op (levels as
    two 4-bit pieces) both compute x W^T of the dequantized weight, within the activation rounding."""
    from tightfit.runtime.kernels import library
    from tightfit.runtime.linear import from_quantized

    qw = rtn(student_t(64, 512, seed=4), WeightFormat.parse(name))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    ref = x @ qw.dequantize().T
    torch_path = from_quantized(qw, kernel="torch")
    assert torch_path.kind == "int4x2" and torch_path.added_error["sqnr_db"] > 45
    assert float((torch_path(x).float() - ref).norm() / ref.norm()) < 5e-3
    if library() is None:
        pytest.skip("tightfit's kernel does not run here (no AVX-512 VNNI or no compiler)")
    lin = from_quantized(qw)
    assert lin.kind == "q4" and lin.lut is not None
    # codes and scales exact: fp16 per group, or a super-block's fp16 d and int8 codes as stored (no mins here)
    assert lin.added_error["sqnr_db"] > 100, lin.added_error
    assert lin.sb == (2 if qw.fmt.superblock else 0)
    scales = 64 * 2 * 2 + 64 * 16 if qw.fmt.superblock else 2 * 64 * 16 * 2
    assert lin.nbytes == 64 * 512 // 2 + scales + 16
    err = float((lin(x) - ref).norm() / ref.norm())
    uniform = from_quantized(rtn(student_t(64, 512, seed=4), WeightFormat.parse("sym4-g32")))
    uref = x @ rtn(student_t(64, 512, seed=4), WeightFormat.parse("sym4-g32")).dequantize().T
    assert err < 1.5 * float((uniform(x) - uref).norm() / uref.norm()) + 1e-3, err
    # prefill's dequantize-to-bf16 path reads the same table
    n, k = qw.shape
    w = torch.empty(n, k, dtype=torch.bfloat16)
    library().dequant_bf16(lin.weight.data_ptr(), lin.scales_zeros.data_ptr(), lin._mn_ptr, n, k, 4, lin.lut.data_ptr(),
                           lin.sb, lin.low, w.data_ptr(), 1)
    g = lin.group_scales(0, n).repeat_interleave(32, 2)
    want = lin.lut[qw.codes.long()].float() * g[0] + g[1]
    assert torch.equal(w, want.bfloat16())


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return build_wide(tmp_path_factory.mktemp("wide-nl") / "llama")


def test_gptq_on_the_grid_through_artifact_runtime_and_exports(wide_model, tmp_path, short_eval_text, capsys):
    import tightfit
    from tightfit.cli import main
    from tightfit.data import sha256_text
    from tightfit.eval import evaluate
    from tightfit.export.compressed_tensors import export_compressed_tensors
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.quant.artifact import load_quantized
    from tightfit.runtime import load_runtime

    def kld(lm, base):
        return evaluate(lm, short_eval_text, text_name="t", text_sha256=sha256_text(short_eval_text), ctx=64,
                        base=base)

    common = ["--method", "gptq", "--calib-samples", "4", "--calib-ctx", "64", "--calib-generated", "0", "--json"]
    assert main(["quantize", str(wide_model), "--format", "nl4-k32", "--embed-format", "sym6-k32", *common,
                 "-o", str(tmp_path / "nl")]) == 0
    assert main(["quantize", str(wide_model), "--format", "sym4-k32", "--embed-format", "sym6-k32", *common,
                 "-o", str(tmp_path / "sym")]) == 0
    capsys.readouterr()
    _, qws, _ = load_quantized(tmp_path / "nl")
    decoder = [n for n in qws if ".layers." in n and n.endswith("proj.weight")]
    assert {qws[n].fmt.name for n in decoder} == {"nl4-k32"}
    base = tightfit.load(wide_model)
    r_nl, r_sym = kld(tightfit.load(tmp_path / "nl"), base), kld(tightfit.load(tmp_path / "sym"), base)
    assert r_nl.kld_mean < r_sym.kld_mean, (r_nl.kld_mean, r_sym.kld_mean)  # 4.25 bpw against 4.31
    # the runtime computes what the artifact holds
    reference = tightfit.load(tmp_path / "nl")
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(reference.model(ids).logits.float(), -1)
        got = torch.log_softmax(load_runtime(tmp_path / "nl").model(ids).logits.float(), -1)
    assert float((ref.exp() * (ref - got)).sum(-1).max()) < 5e-3
    # GGUF: IQ4_XS blocks code for code, read back by tightfit and by the runtime without re-quantizing
    report = export_gguf(tmp_path / "nl", tmp_path / "nl.gguf", strict=True)
    assert report["exact"] and {r["ggml_type"] for n, r in report["tensors"].items() if n in decoder} == {"IQ4_XS"}
    r = kld(tightfit.load(tmp_path / "nl.gguf"), reference)
    assert r.kld_max < 1e-4 and r.top1_agreement == 1.0
    rt = load_runtime(tmp_path / "nl.gguf")
    assert not rt.model.info.get("gguf_requantized")  # IQ4_XS, IQ4_NL and the Q6_K embedding as stored
    with torch.no_grad():
        from_gguf = torch.log_softmax(rt.model(ids).logits.float(), -1)
    assert float((got.exp() * (got - from_gguf)).sum(-1).max()) < 5e-3
    # compressed-tensors holds uniform integer grids only: re-quantized and said so, refused with strict
    with pytest.raises(FormatError, match="codes index a non-uniform grid.*re-quantized to sym4-g32"):
        export_compressed_tensors(tmp_path / "nl", tmp_path / "ct", strict=True)
    assert not (tmp_path / "ct").exists()
    ct = export_compressed_tensors(tmp_path / "nl", tmp_path / "ct")
    assert not ct["exact"]
