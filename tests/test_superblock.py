"""Super-block ("k") formats: scales and mins quantized under one fp16 pair per 256 weights, as llama.cpp's K-quants.

Checked against gguf-py's own dequantizers (an independent reading of ggml's block layouts), on disk through the
artifact, in the runtime, and in the GGUF export; quality floors against the plain group formats."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from tightfit.errors import ArtifactError, FormatError
from tightfit.formats.ggml import to_ggml
from tightfit.formats.weight import WeightFormat, decode_scales, encode_scales
from tightfit.quant.core import QuantizedWeight, rtn

from .conftest import make_tokenizer, save_random

SUPER = ["asym2-k32", "asym3-k32", "asym4-k32", "asym5-k32", "asym6-k32", "sym4-k32", "sym6-k32", "sym6-k16",
         "sym8-k32"]


def student_t(rows=64, cols=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi = torch.randn(5, rows, cols, generator=g).pow(2).sum(0)
    w = 0.02 * z / (chi / 5).sqrt()
    w[3, :32] = w[3, :32].abs() + 0.01  # a group with only positive weights: its min must still be <= 0
    w[5, 256:288] = 0  # a dead group beside live ones in one super-block
    return w


def test_names_sizes_and_ggml_types():
    for name in SUPER:
        assert WeightFormat.parse(name).name == name
    shape = (8, 1024)
    for name, ggml in (("asym4-k32", "Q4_K"), ("asym5-k32", "Q5_K"), ("sym6-k32", "Q6_K"), ("sym6-k16", "Q6_K")):
        f = WeightFormat.parse(name)
        assert f.ggml_type == ggml
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml]]
        if name != "sym6-k32":  # Q6_K repeats each 32-group's int8 code over its two 16-weight halves: 8 bytes more
            assert f.nbytes(shape) == shape[0] * shape[1] // block * size
    assert WeightFormat.parse("asym4-k32").bits_per_weight(shape) == 4.5
    assert WeightFormat.parse("asym3-k32").bits_per_weight(shape) == 3.5
    assert WeightFormat.parse("asym4-k32").flat() == WeightFormat(4, 32, False)
    with pytest.raises(FormatError, match="super-block formats have groups of 32"):
        WeightFormat(4, 64, False, superblock=True)
    with pytest.raises(FormatError, match="groups of 16 under super-blocks take int8 scale codes and no min"):
        WeightFormat.parse("asym4-k16")
    assert WeightFormat.parse("sym6-k16").for_shape((8, 576)).name == "sym6-g32"  # as Q6_K files fall back
    with pytest.raises(FormatError, match=re.escape("asym4-k32 needs rows of a multiple of 256 weights (its "
                                                    "super-blocks); w's input dimension is 576: use asym4-g32")):
        WeightFormat.parse("asym4-k32").check_shape((8, 576), "w")
    with pytest.raises(FormatError, match="cannot read format name 'asym4-x32'"):
        WeightFormat.parse("asym4-x32")


@pytest.mark.parametrize("name", SUPER)
def test_scales_are_exact_codes_and_store_in_the_stated_bytes(name):
    fmt = WeightFormat.parse(name)
    w = student_t()
    qw = rtn(w, fmt)
    stored = encode_scales(qw.scales, qw.mins, fmt)
    scales, mins = decode_scales(stored, fmt, qw.shape)
    assert torch.equal(scales, qw.scales.float())
    assert mins is None if fmt.symmetric else torch.equal(mins, qw.mins.float())
    if not fmt.symmetric:
        assert float(qw.mins.max()) <= 0
    assert qw.packed_bytes.numel() + sum(t.numel() * t.element_size() for t in stored.values()) == fmt.nbytes(qw.shape)
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("name", ["asym4-k32", "asym5-k32", "sym6-k32", "sym6-k16"])
def test_ggml_blocks_dequantize_in_gguf_py_to_our_weights(name):
    fmt = WeightFormat.parse(name)
    qw = rtn(student_t(seed=1), fmt)
    ggml, raw = to_ggml(qw)
    assert ggml == fmt.ggml_type and raw.shape == (64, 512 // 256 * gguf.GGML_QUANT_SIZES[
        gguf.GGMLQuantizationType[ggml]][1])
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[ggml]).reshape(qw.shape)
    assert np.array_equal(back, qw.dequantize().numpy())
    # the blocks' own super-block scales (what the runtime holds of a GGUF's K-quants): d * code and dmin * code
    # give the effective scales and mins the block reader gives
    from tightfit.formats.ggml import from_k_blocks, from_q6_blocks, super_scales

    d, sc, dmin, m = super_scales(raw, ggml, *qw.shape)
    eff = from_q6_blocks(raw, *qw.shape)[1:] if ggml == "Q6_K" else from_k_blocks(raw, ggml, *qw.shape)[1:]
    per = sc.shape[1] // d.shape[1]
    assert sc.shape[1] == qw.shape[1] // (16 if ggml == "Q6_K" else 32)
    assert np.array_equal((d.float().repeat_interleave(per, 1) * sc.float()).numpy(), eff[0])
    if ggml != "Q6_K":
        assert np.array_equal((-dmin.float().repeat_interleave(per, 1) * m.float()).numpy(), eff[1])
    if ggml == "Q6_K":  # and the reader takes the blocks back to sym6-k16's codes and per-16 scales
        from tightfit.formats.ggml import from_q6_blocks

        codes, scales = from_q6_blocks(raw, *qw.shape)
        back_qw = QuantizedWeight(WeightFormat.parse("sym6-k16"), torch.from_numpy(codes), torch.from_numpy(scales), None)
        assert np.array_equal(back_qw.dequantize().numpy(), back)
        if name == "sym6-k16":
            assert torch.equal(back_qw.codes, qw.codes) and torch.equal(back_qw.scales, qw.scales.float())


@pytest.mark.parametrize("bits,sym", [(3, False), (4, False), (5, False), (6, True)])
def test_super_block_scales_cost_little_quality_for_their_bits(bits, sym):
    w = student_t(128, 1024, seed=2)
    flat = rtn(w, WeightFormat(bits, 32, sym)).error["sqnr_db"]
    k = rtn(w, WeightFormat(bits, 32, sym, superblock=True)).error["sqnr_db"]
    assert k > flat - 0.3, (k, flat)  # 0.5 bpw (asym) / 0.19 bpw (sym) less for at most 0.3 dB


def test_scales_not_made_by_the_super_block_quantizer_are_refused():
    fmt = WeightFormat.parse("asym4-k32")
    flat = rtn(student_t(), fmt.flat())
    with pytest.raises(FormatError, match="not fp16 super-scales times integer codes"):
        encode_scales(flat.scales, flat.mins, fmt)
    qw = rtn(student_t(), fmt)
    stored = encode_scales(qw.scales, qw.mins, fmt)
    with pytest.raises(FormatError, match=re.escape("asym4-k32 [64, 512]: its super should be float16 [64, 2, 2], "
                                                    "found float16 [64, 1, 2]")):
        decode_scales(stored | {"super": stored["super"][:, :1]}, fmt, qw.shape)


def build_wide(folder, tied: bool = True):
    """A tiny Llama whose rows are 256 and 512 wide: every projection takes a super-block format."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    tok = make_tokenizer(add_bos=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    return save_random(config, tok, folder, 0.08)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return build_wide(tmp_path_factory.mktemp("wide") / "llama")


@pytest.mark.parametrize("tied", [False, True])
def test_the_head_takes_its_own_format(tmp_path, tied):
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    model = build_wide(tmp_path / "m", tied=tied)
    k4, q6 = WeightFormat.parse("asym4-k32"), WeightFormat.parse("sym6-k32")
    m = quantize(model, QuantConfig(method="rtn", fmt=k4, embed_fmt=k4, head_fmt=q6), tmp_path / "a")
    assert m["config"]["head_fmt"] == "sym6-k32"
    if tied:  # one table, read whole every token as the head: the head's format
        assert m["tensors"]["model.embed_tokens.weight"]["format"] == "sym6-k32" and "lm_head.weight" not in m["tensors"]
    else:
        assert m["tensors"]["model.embed_tokens.weight"]["format"] == "asym4-k32"
        assert m["tensors"]["lm_head.weight"]["format"] == "sym6-k32"


def test_gptq_artifact_runtime_and_gguf_export_hold_the_codes(wide_model, tmp_path, short_eval_text):
    import tightfit
    from tightfit.data import sha256_text
    from tightfit.eval import evaluate
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.formats.size import gguf_bits_per_weight
    from tightfit.quant.api import quantize
    from tightfit.quant.artifact import load_quantized
    from tightfit.quant.config import QuantConfig
    from tightfit.runtime import load_runtime

    def kld(lm, base):
        return evaluate(lm, short_eval_text, text_name="t", text_sha256=sha256_text(short_eval_text), ctx=64,
                        base=base)

    k4, embed = WeightFormat.parse("asym4-k32"), WeightFormat.parse("sym6-k32")
    common = dict(method="gptq", calib_samples=4, calib_ctx=64, calib_generated=0)
    mk = quantize(wide_model, QuantConfig(fmt=k4, embed_fmt=embed, **common), tmp_path / "k")
    mf = quantize(wide_model, QuantConfig(fmt=k4.flat(), embed_fmt=embed.flat(), **common), tmp_path / "flat")
    decoder = [n for n in mk["tensors"] if ".layers." in n and n.endswith("proj.weight")]
    assert {mk["tensors"][n]["format"] for n in decoder} == {"asym4-k32"}
    assert all(mk["tensors"][n]["bits_per_weight"] == 4.5 for n in decoder)
    assert mk["tensors"]["model.embed_tokens.weight"]["format"] == "sym6-k32"
    assert mk["bits_per_weight"] < mf["bits_per_weight"] - 0.4
    # read back from disk: the effective scales exactly as quantized
    _, qk, _ = load_quantized(tmp_path / "k")
    q = qk["model.layers.1.mlp.down_proj.weight"]
    assert q.fmt == k4 and float(q.mins.max()) <= 0
    base = tightfit.load(wide_model)
    r_k, r_flat = kld(tightfit.load(tmp_path / "k"), base), kld(tightfit.load(tmp_path / "flat"), base)
    assert r_k.kld_mean < 1.3 * r_flat.kld_mean + 1e-4, (r_k.kld_mean, r_flat.kld_mean)
    # the runtime (tightfit's int8 kernel, scales expanded per group) computes what the artifact holds
    reference = tightfit.load(tmp_path / "k")
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(reference.model(ids).logits.float(), -1)
        got = torch.log_softmax(load_runtime(tmp_path / "k").model(ids).logits.float(), -1)
    assert float((ref.exp() * (ref - got)).sum(-1).max()) < 5e-3
    # GGUF: Q4_K and Q6_K blocks, code for code; llama.cpp's layout read back by gguf-py
    report = export_gguf(tmp_path / "k", tmp_path / "k.gguf", strict=True)
    assert report["exact"]
    assert {r["ggml_type"] for n, r in report["tensors"].items() if n in decoder} == {"Q4_K"}
    assert report["tensors"]["model.embed_tokens.weight"]["ggml_type"] == "Q6_K"
    # one size function: the same bytes, but Q6_K's 16 scale codes per 256 weights where sym6-k32 keeps 8
    extra = mk["tensors"]["model.embed_tokens.weight"]["parameters"] // 256 * 8
    assert gguf_bits_per_weight(tmp_path / "k.gguf") == pytest.approx(
        (mk["size_bytes"] + extra) * 8 / mk["parameters"])
    r = kld(tightfit.load(tmp_path / "k.gguf"), reference)
    assert r.kld_max < 1e-4 and r.top1_agreement == 1.0
    # the runtime on that GGUF: Q4_K and Q6_K codes as stored (the 6-bit kernel), nothing re-quantized
    rt = load_runtime(tmp_path / "k.gguf")
    assert not rt.model.info.get("gguf_requantized")
    head = rt.model.head
    assert head.kind == "q6" and head.sb == 3 and head.added_error["sqnr_db"] > 100
    assert rt.model.embed.table is head and rt.model.weight_bytes()["embedding"] == 0  # the tied table held once
    toks = torch.tensor([[3, 0, 7], [9, 9, 1]])
    emb = tightfit.load(tmp_path / "k.gguf").model.get_input_embeddings()(toks).float()
    assert torch.equal(rt.model.embed(toks), emb)  # its rows exactly as the codes give them
    with torch.no_grad():
        from_gguf = torch.log_softmax(rt.model(ids).logits.float(), -1)
    assert float((got.exp() * (got - from_gguf)).sum(-1).max()) < 5e-3


def test_rows_not_a_multiple_of_256_keep_plain_group_scales(tiny_models, tmp_path):
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    m = quantize(tiny_models["qwen2"], QuantConfig(method="rtn", fmt=WeightFormat.parse("asym4-k32"),
                                                   embed_fmt=WeightFormat.parse("sym6-k32")), tmp_path / "a")
    assert {e["format"] for n, e in m["tensors"].items() if n.endswith("proj.weight")} == {"asym4-g32"}
    assert m["tensors"]["model.embed_tokens.weight"]["format"] == "sym6-g32"


def test_a_damaged_super_block_tensor_is_an_artifact_error(wide_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from tightfit.quant.api import quantize
    from tightfit.quant.artifact import load_quantized
    from tightfit.quant.config import QuantConfig

    quantize(wide_model, QuantConfig(method="rtn", fmt=WeightFormat.parse("asym4-k32")), tmp_path / "a")
    path = tmp_path / "a" / "weights.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.mlp.down_proj.weight"  # [256, 512]: two super-blocks per row
    tensors[f"{name}.super"] = tensors[f"{name}.super"][:, :1].contiguous()
    save_file(tensors, path)
    with pytest.raises(ArtifactError, match=re.escape(f"tensor {name}: asym4-k32 [256, 512]: its super should be "
                                                      "float16 [256, 2, 2], found float16 [256, 1, 2]; the artifact "
                                                      "is corrupt. Quantize it again.")):
        load_quantized(tmp_path / "a")


def test_cli_super_blocks_and_embed_format(wide_model, tmp_path, capsys):
    import json

    from tightfit.cli import main

    assert main(["quantize", str(wide_model), "--method", "rtn", "--super-blocks", "--embed-format", "sym6-k32",
                 "-o", str(tmp_path / "a"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bits_per_weight"] < 5.0
    assert main(["quantize", str(wide_model), "--method", "rtn", "--super-blocks", "--group-size", "64",
                 "-o", str(tmp_path / "b")]) == 2
    assert "super-block formats have groups of 32" in capsys.readouterr().err


@pytest.mark.parametrize("bits_sym", [("5", "sym"), ("5", "asym")])
def test_q5_gguf_tensors_run_from_their_codes(tiny_models, tmp_path, bits_sym):
    """Q5_0 / Q5_1 tensors of a GGUF run from their stored codes, none re-quantized, and compute what the artifact
    they were exported from computes."""
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig
    from tightfit.runtime import load_runtime

    fmt = WeightFormat.parse(f"{bits_sym[1]}{bits_sym[0]}-g32")
    quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=fmt, embed_fmt=fmt), tmp_path / "a")
    report = export_gguf(tmp_path / "a", tmp_path / "a.gguf", strict=True)
    assert {r["ggml_type"] for r in report["tensors"].values() if r.get("ggml_type", "F32") not in ("F32", "F16")} \
        == {fmt.ggml_type}
    rt = load_runtime(tmp_path / "a.gguf")
    assert not rt.model.info.get("gguf_requantized")
    ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(load_runtime(tmp_path / "a").model(ids).logits.float(), -1)
        got = torch.log_softmax(rt.model(ids).logits.float(), -1)
    assert float((want.exp() * (want - got)).sum(-1).max()) < 1e-4


@pytest.mark.parametrize("name", SUPER + ["nl4-k32"])
def test_the_kernel_reads_super_block_codes_as_stored(name, monkeypatch):
    """The runtime keeps a super-block format's own scales (fp16 d, dmin per 256; int8 codes per 32) instead of an
    fp16 scale and min per group: exact, fewer bytes, and the same products as the per-group layout, in decode
    (one row), small batches and prefill's dequantize-to-bf16 path."""
    from tightfit.runtime import linear as rl
    from tightfit.runtime.kernels import library

    if library() is None:
        pytest.skip("tightfit's kernel does not run here (no AVX-512 VNNI or no compiler)")
    fmt = WeightFormat.parse(name)
    qw = rtn(student_t(64, 1024, seed=5), fmt)
    lin = rl.from_quantized(qw)
    assert lin.kind == ("q4" if fmt.bits <= 4 else "q6" if fmt.bits <= 6 else "q8")
    assert lin.sb == (3 if fmt.group_size == 16 else 2 if fmt.symmetric else 1)
    assert lin.weight.numel() == 64 * 1024 * int(lin.kind[1]) // 8
    assert lin.added_error["sqnr_db"] > 100, lin.added_error  # d * code exact in fp32
    code_bytes = 64 * 1024 // fmt.group_size * (1 if fmt.symmetric else 2)
    super_bytes = 64 * 1024 // 256 * 2 * (1 if fmt.symmetric else 2)
    per_group = 64 * 1024 // 32 * 4
    assert lin.nbytes - lin.weight.numel() - (16 if lin.lut is not None else 0) == code_bytes + super_bytes
    assert code_bytes + super_bytes < per_group
    flat = rl.from_quantized(qw, check=False)
    flat.scale_codes, flat.low = None, 0  # the same weight in the per-group fp16 layout
    flat.scales_zeros = torch.stack([lin.group_scales(0, 64)[i].half() for i in (0, 1)]).contiguous()
    g = torch.Generator().manual_seed(6)
    ref_w = qw.dequantize()
    for m in (1, 3, 8, 70):
        x = torch.randn(m, 1024, generator=g)
        for prefill in ("vnni", ""):
            monkeypatch.setenv("TIGHTFIT_PREFILL", prefill)
            rl.amx.cache_clear()
            y = lin(x)
            ref = x @ ref_w.T
            assert float((y - ref).norm() / ref.norm()) < 2e-2, (m, prefill)
            if rl.amx() and m >= rl.AMX_MIN_ROWS:
                continue  # bf16 activations on AMX: the first bound is the one that holds
            # the int8 path's own arithmetic: activations rounded per 32 to int8 (amax / 127), then exact
            xb = x.reshape(m, -1, 32)
            dx = xb.abs().amax(-1, keepdim=True) / 127
            xq = (torch.round(xb * torch.where(dx > 0, 1 / dx, 0)) * dx).reshape(m, -1)  # x * (1 / d), as the kernel
            exact = (xq.double() @ ref_w.double().T).float()
            assert float((y - exact).norm() / exact.norm()) < 1e-3, (m, prefill)
            if fmt.group_size != 16:  # no per-group fp16 layout holds scales per 16
                y_flat = flat(x)
                assert float((y - y_flat).norm() / y_flat.norm()) < 2e-3, (m, prefill)
    rl.amx.cache_clear()
    # prefill's dequantize-to-bf16 (for AMX, where the CPU has it): bit-equal to the weight rounded to bf16
    if lin.kind in ("q4", "q6"):
        w = torch.empty(64, 1024, dtype=torch.bfloat16)
        library().dequant_bf16(lin.weight.data_ptr(), lin.scales_zeros.data_ptr(), lin._mn_ptr, 64, 1024, lin.group,
                               lin._lut_ptr, lin.sb, lin.low, w.data_ptr(), 1)
        assert torch.equal(w, ref_w.bfloat16())


def test_a_q4_k_m_like_gguf_decodes_in_c_at_its_file_size(wide_model, tmp_path):
    """llama.cpp's Q4_K_M mixes types inside one fused projection (q, k in Q4_K, v in Q6_K) and keeps ffn_down in
    Q6_K: every tensor runs from its codes (nothing re-quantized), the mixed q/k/v chain runs in the one-call C
    decode step with the same logits as the per-op path, and the weights are held at about the file's size."""
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig
    from tightfit.runtime import load_runtime
    from tightfit.runtime.linear import Concat

    q6 = WeightFormat.parse("sym6-k16")
    six = {f"model.layers.{i}.{n}.weight": q6 for i in range(2) for n in ("self_attn.v_proj", "mlp.down_proj")}
    quantize(wide_model, QuantConfig(method="rtn", fmt=WeightFormat.parse("asym4-k32"), embed_fmt=q6,
                                     tensor_formats=six, calib_generated=0.0), tmp_path / "a")
    export_gguf(tmp_path / "a", tmp_path / "m.gguf", strict=True)
    e = load_runtime(tmp_path / "m.gguf").model
    assert not e.info.get("gguf_requantized")
    qkv = e.layers[0].qkv
    assert isinstance(qkv, Concat) and [p.kind for p in qkv.parts] == ["q4", "q4", "q6"]
    assert e.layers[0].down.kind == "q6" and e.layers[0].down.sb == 3
    assert e.fused() is not None  # the chain runs in C
    w = e.weight_bytes()
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors)
    assert w["layers"] + w["head"] + w["embedding"] + w["norms"] < 1.06 * tensor_bytes
    ids = torch.arange(5, 25).tolist()

    def steps(fused: bool) -> torch.Tensor:
        if not fused:
            e._fused = None
        else:
            e.__dict__.pop("_fused", None)
        c, out = e.new_cache(1, 64), []
        e.forward(torch.tensor([ids[:10]]), 0, c)
        for p in range(10, 20):
            out.append(e.forward(torch.tensor([[ids[p]]]), p, c)[0, -1].float())
        return torch.log_softmax(torch.stack(out), -1)

    a, b = steps(True), steps(False)
    assert float((a.exp() * (a - b)).sum(-1).max()) < 1e-3
    # the batched C step (the server's) through the same chain: two rows against each alone
    e.__dict__.pop("_fused", None)
    caches = [e.new_cache(1, 64) for _ in range(2)]
    for c, n in zip(caches, (6, 13)):
        e.forward(torch.tensor([ids[:n]]), 0, c)
    rows = torch.log_softmax(e.decode_rows([7, 8], [6, 13], caches).float(), -1)
    for r, n in enumerate((6, 13)):
        c = e.new_cache(1, 64)
        e.forward(torch.tensor([ids[:n]]), 0, c)
        alone = torch.log_softmax(e.forward(torch.tensor([[7 + r]]), n, c)[0, -1].float(), -1)
        assert float((alone.exp() * (alone - rows[r])).sum()) < 1e-4
