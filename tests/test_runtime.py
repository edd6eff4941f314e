"""The runtime against the transformers reference built from the same weights; KV formats; sampling; budgets."""

import re

import pytest
import torch

import tightfit
from tightfit.cli import main
from tightfit.errors import (
    ContextError,
    FormatError,
    MemoryBudgetError,
    UnsupportedArchitectureError,
)
from tightfit.export.gguf_quant import export_gguf
from tightfit.formats import WeightFormat
from tightfit.quant.api import quantize
from tightfit.quant.config import QuantConfig
from tightfit.quant.core import rtn
from tightfit.runtime import SamplingParams, generate, load_runtime
from tightfit.runtime.kernels import library
from tightfit.runtime.linear import from_quantized

CTX = 64


def kld(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def ids_of(lm, text: str, n: int = 48) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"][:n]])


FORMATS = ["sym4-g32", "asym4-g32", "asym3-g32", "sym2-g64", "asym5-g32", "sym6-g32", "sym8-g32", "asym8-pc",
           "asym4-g32-bfloat16"]


@pytest.mark.skipif(library() is None, reason="tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_runs_exactly_on_tightfits_kernel(fmt):
    f = WeightFormat.parse(fmt)
    torch.manual_seed(0)
    # one partial chunk of 4 blocks; a whole chunk of 16 and a partial one of 2, on an odd number of rows
    for n, k in ((96, 128), (53, 576)):
        w = torch.randn(n, k) * 0.05
        qw = rtn(w, f)
        lin = from_quantized(qw)
        assert lin.kind == ("q4" if f.bits <= 4 else "q6" if f.bits <= 6 else "q8")
        assert lin.added_error["sqnr_db"] > 100  # codes, fp16 scales and mins copied exactly
        # single tokens, a few (tiles of rows x 4 tokens streamed once) and prefill (M > 16: panels of rows in
        # cache under 4-token tiles), each with their tails of rows and tokens
        for m in (1, 3, 6, 9, 19, 37):
            x = torch.randn(m, k)
            ref = x @ qw.dequantize().T
            # int8 activations per 32 columns (as llama.cpp's): about 0.5% relative output error
            assert float((lin(x) - ref).norm() / ref.norm()) < 0.015
            # and exactly the kernel's own arithmetic: activations rounded per 32 to int8 (amax / 127)
            xb = x.reshape(m, -1, 32)
            dx = xb.abs().amax(-1, keepdim=True) / 127
            xq = torch.round(xb * torch.where(dx > 0, 1 / dx, 0)) * dx  # x * (1 / d), as the kernel rounds
            exact = xq.reshape(m, k).double() @ qw.dequantize().double().T
            assert float((lin(x) - exact).norm() / exact.norm()) < 1e-3, (n, k, m)  # a layout slip: ~1


@pytest.mark.skipif(library() is None, reason="tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
def test_prefills_row_ops_in_c_match_torch():
    """RMSNorm, rotate-half RoPE (in place, on the q and k heads of a qkv row, full and partial rotary) and the
    gated activations, as prefill runs them in the kernel library."""
    import torch.nn.functional as F

    lib, g = library(), torch.Generator().manual_seed(3)
    M, n = 7, 96
    h, w = torch.randn(M, n, generator=g), torch.randn(n, generator=g)
    out = torch.empty(M, n)
    lib.norm_rows(h.data_ptr(), w.data_ptr(), M, n, 1e-6, out.data_ptr(), 2)
    assert torch.allclose(out, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w, atol=1e-5)
    B, T, H, KV, hd = 2, 5, 4, 2, 16
    for rot in (hd, 8):
        qkv = torch.randn(B, T, H + 2 * KV, hd, generator=g)
        ang = torch.randn(T, 1, rot // 2, generator=g)
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
        qk = qkv[:, :, : H + KV]
        r, half = qk[..., :rot], rot // 2
        ref = torch.cat((r * cos + torch.cat((-r[..., half:], r[..., :half]), -1) * sin, qk[..., rot:]), -1)
        v = qkv[:, :, H + KV:].clone()
        lib.rope_rows(qkv.data_ptr(), B * T, qkv.stride(1), H + KV, hd, rot, cos.data_ptr(), sin.data_ptr(), T,
                      cos.stride(0), 2)
        assert torch.allclose(qkv[:, :, : H + KV], ref, atol=1e-5), rot
        assert torch.equal(qkv[:, :, H + KV:], v)  # the v heads untouched
    gu = torch.randn(M, 2 * n, generator=g) * 4
    for kind, act in ((0, F.silu), (1, lambda x: F.gelu(x, approximate="tanh"))):
        out = torch.empty(M, n)
        lib.gate_rows(kind, gu.data_ptr(), M, n, out.data_ptr(), 2)
        assert torch.allclose(out, act(gu[:, :n]) * gu[:, n:], atol=1e-4, rtol=1e-4), kind


@pytest.mark.skipif(library() is None, reason="tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
def test_many_rows_of_a_4_bit_product_run_as_a_bf16_gemm_where_the_cpu_has_amx(monkeypatch):
    from tightfit.runtime.linear import AMX_MIN_ROWS, amx

    if not amx():
        pytest.skip("no AMX tiles here: prefill keeps the int8 kernel")
    qw = rtn(torch.randn(160, 256) * 0.05, WeightFormat.parse("asym4-g32"))
    lin = from_quantized(qw)
    x = torch.randn(AMX_MIN_ROWS * 2 + 5, 256)  # not a multiple of 64: rows padded for oneDNN, then cut
    ref = x @ qw.dequantize().T
    y = lin(x)  # the codes dequantized to bf16 in C, one GEMM on the AMX tiles
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = float((y - ref).norm() / ref.norm())
    assert err < 0.008  # bf16 weights and activations: below the int8-activation kernel's ~0.5%
    monkeypatch.setenv("TIGHTFIT_PREFILL", "vnni")
    amx.cache_clear()
    try:
        vnni = lin(x)
    finally:
        monkeypatch.delenv("TIGHTFIT_PREFILL")
        amx.cache_clear()
    assert float((vnni - ref).norm() / ref.norm()) < 0.015 and float((vnni - y).norm() / ref.norm()) < 0.02


@pytest.mark.skipif(library() is None, reason="tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_artifact_bytes_repack_into_the_kernels_layout_exactly(bits):
    """The load repacks an artifact's packed codes in C (no int16 codes): the same bytes as pack_blocks, on rows
    of a whole chunk of 16 blocks plus a partial one."""
    from tightfit.formats.weight import pack
    from tightfit.runtime.linear import pack_blocks

    f = WeightFormat(bits, 32, False)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(f.qmin, f.qmax + 1, (37, 576), generator=g, dtype=torch.int16)
    kb = 4 if bits <= 4 else 6 if bits <= 6 else 8
    src, out = pack(codes, f).contiguous(), torch.empty(37, 576 * kb // 8, dtype=torch.uint8)
    library().repack_codes(src.data_ptr(), bits, 37, 576, kb, out.data_ptr(), 2)
    assert torch.equal(out, pack_blocks(codes - f.qmin, kb))
    # a GGUF's codes (one byte each, as its blocks unpack) take the same C path at load
    u, out8 = (codes - f.qmin).to(torch.uint8).contiguous(), torch.zeros_like(out)
    library().repack_codes(u.data_ptr(), 8, 37, 576, kb, out8.data_ptr(), 2)
    assert torch.equal(out8, out)


@pytest.mark.skipif(library() is None, reason="tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
@pytest.mark.parametrize("fmt", ["sym4-g32", "asym4-g128", "nl4-g32", "sym6-g32", "asym8-pc"])
def test_kernels_added_error_equals_its_dequantized_rows(fmt):
    """The added error the load reports comes from per-block sums of the codes (no dequantized weight): it equals
    the error of the kernel's own rows (dequant_f32) against the artifact's, on scales that fp16 must round."""
    f = WeightFormat.parse(fmt)
    torch.manual_seed(1)
    qw = rtn(torch.randn(70, 256) * 0.05, f)
    qw.scales = qw.scales.float() * (1 + 1e-3 * torch.randn(qw.scales.shape))
    if qw.mins is not None:
        qw.mins = qw.mins.float() * (1 + 1e-3 * torch.randn(qw.mins.shape))
    lin = from_quantized(qw)
    assert lin.kind in ("q4", "q6", "q8")
    w, got = qw.dequantize().double(), lin.rows(torch.arange(70)).double()
    rel = float(((got - w) ** 2).sum() / (w ** 2).sum())
    assert 45 < lin.added_error["sqnr_db"] < 90  # fp16 rounding of the perturbed scales, not exact
    assert lin.added_error["weight_rel_mse"] == pytest.approx(rel, rel=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_runs_on_torchs_int4_op_with_its_added_error(fmt):
    f = WeightFormat.parse(fmt)
    w = torch.randn(96, 128) * 0.05
    qw = rtn(w, f)
    lin = from_quantized(qw, kernel="torch")
    assert lin.kind == ("int4" if f.bits <= 4 else "int4x2")
    x = torch.randn(3, 128).bfloat16()
    ref = x.float() @ qw.dequantize().T
    y = lin(x).float()
    # bf16 output rounding plus the bf16 scales: far below the format's own quantization error
    assert float((y - ref).norm() / ref.norm()) < 0.01
    # at 8 bits bf16 scales (8 significant bits) add about a tenth of the format's own error power
    assert lin.added_error["sqnr_db"] > (6 if f.bits == 8 else 10) + qw.error["sqnr_db"]


def test_act_order_g_idx_runs_as_an_input_permutation():
    from tightfit.quant.gptq import gptq

    w = torch.randn(64, 128) * 0.05
    X = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
    qw = gptq(w, X.T @ X / 512, WeightFormat(4, 32, False), act_order=True, static_groups=False)
    assert qw.g_idx is not None
    for kernel in ("auto", "torch"):
        lin = from_quantized(qw, kernel=kernel)
        x = torch.randn(2, 128).bfloat16()
        ref = x.float() @ qw.dequantize().T
        assert float((lin(x).float() - ref).norm() / ref.norm()) < 0.015


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_runtime_logits_match_the_reference_model(tiny_models, short_eval_text, arch):
    ref = tightfit.load(tiny_models[arch])
    rt = load_runtime(tiny_models[arch])
    ids = ids_of(ref, short_eval_text)
    with torch.inference_mode():
        want = ref.model(ids).logits[0]
    got = rt.model(ids).logits[0]
    # bf16 weights and activations against fp32: tolerance KLD 2e-3, logits within 3% of their range
    assert kld(want, got) < 2e-3
    assert float((want - got).abs().max()) < 0.03 * float(want.abs().max())
    # incremental decoding gives what one pass gives
    cache = rt.model.new_cache(1, 64)
    first = rt.model.forward(ids[:, :20], 0, cache, 20)[0]
    steps = [rt.model.forward(ids[:, i:i + 1], i, cache)[0] for i in range(20, ids.shape[1])]
    assert kld(got, torch.cat([first] + steps)) < 1e-3


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt-artifacts")
    out = {}
    for name, cfg in {"sym4": QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True)),
                      "asym3": QuantConfig(method="hqq", fmt=WeightFormat(3, 32, False)),
                      "gptq-dyn": QuantConfig(method="gptq", fmt=WeightFormat(4, 32, False), static_groups=False,
                                              calib_samples=4, calib_ctx=CTX),
                      "mixed": QuantConfig(method="rtn", fmt=WeightFormat(4, 32, False), tensor_formats={
                          "model.layers.0.self_attn.k_proj.weight": WeightFormat.parse("sym8-g32"),
                          "model.layers.1.mlp.up_proj.weight": WeightFormat.parse("asym2-g32")}, calib_samples=4, calib_ctx=CTX)}.items():
        quantize(tiny_models["llama"], cfg, root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["sym4", "asym3", "gptq-dyn", "mixed"])
def test_artifact_runs_as_its_dequantized_weights(artifacts, short_eval_text, name):
    ref = tightfit.load(artifacts[name])  # fp32 dequantized stand-in
    rt = load_runtime(artifacts[name])
    ids = ids_of(ref, short_eval_text)
    with torch.inference_mode():
        want = ref.model(ids).logits[0]
    assert kld(want, rt.model(ids).logits[0]) < 2e-3
    errs = rt.model.info["runtime_added_error"]
    assert errs and min(e["sqnr_db"] for e in errs.values()) > 35


def test_gguf_codes_run_exactly_as_the_artifact(artifacts, tmp_path, short_eval_text):
    export_gguf(artifacts["sym4"], tmp_path / "m.gguf")
    a, g = load_runtime(artifacts["sym4"]), load_runtime(tmp_path / "m.gguf")
    assert g.model.layers[0].qkv.kind in ("q4", "int4")  # Q4_0 codes taken as stored, not dequantized
    ids = ids_of(a, short_eval_text)
    assert torch.equal(a.model(ids).logits, g.model(ids).logits)


def test_eval_of_an_artifact_runs_the_runtime_and_kv_formats_cost_quality(artifacts, tiny_models, short_eval_text, capsys):
    import json

    def ev(*extra):
        assert main(["eval", str(artifacts["sym4"]), "--base", str(tiny_models["llama"]), "--text", txt,
                     "--ctx", str(CTX), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    txt = artifacts["sym4"].parent / "text.txt"
    txt.write_text(short_eval_text)
    txt = str(txt)
    runs = {kv: ev("--kv-format", kv) for kv in ("bf16", "int8", "int4")}
    assert ev()["kld_mean"] == pytest.approx(runs["bf16"]["kld_mean"])
    assert runs["bf16"]["extra"]["runner"] == "runtime"
    assert runs["int8"]["kld_mean"] < runs["bf16"]["kld_mean"] + 0.02
    assert runs["int4"]["kld_mean"] > runs["int8"]["kld_mean"]


def test_generate_streams_stops_and_seeds(tiny_models):
    lm = load_runtime(tiny_models["llama"])
    ids = lm.tokenizer("The state of the union")["input_ids"]
    steps = list(generate(lm.model, lm.tokenizer, ids, 12, ignore_eos=True))
    assert len(steps) == 12 and steps[-1].finish_reason == "length"
    text = "".join(s.text for s in steps)
    assert text == lm.tokenizer.decode([s.token for s in steps], skip_special_tokens=True)
    stop = text[5:8]
    cut = "".join(s.text for s in generate(lm.model, lm.tokenizer, ids, 12, stop=[stop], ignore_eos=True))
    assert cut == text[:text.index(stop)]
    hot = SamplingParams(temperature=1.5, seed=7)
    a = [s.token for s in generate(lm.model, lm.tokenizer, ids, 10, hot, ignore_eos=True)]
    assert a == [s.token for s in generate(lm.model, lm.tokenizer, ids, 10, hot, ignore_eos=True)]


def test_bad_input_typed_errors(tiny_models, tmp_path):
    lm = load_runtime(tiny_models["llama"])
    with pytest.raises(ContextError, match=re.escape("the prompt has 1100 tokens but the context holds 1024: "
                                                     "shorten the prompt.")):
        next(generate(lm.model, lm.tokenizer, [5] * 1100, 4))
    with pytest.raises(ContextError, match=re.escape("lower max_tokens to at most 24")):
        next(generate(lm.model, lm.tokenizer, [5] * 1000, 100))
    with pytest.raises(FormatError, match="unknown KV-cache format 'int3'"):
        load_runtime(tiny_models["llama"], kv_format="int3")
    import json
    import shutil

    shutil.copytree(tiny_models["llama"], tmp_path / "gpt2")
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape("holds a 'gpt2' model; tightfit handles model "
                                                                     "types ['llama', 'mistral', 'qwen2'")):
        load_runtime(tmp_path / "gpt2")
    with pytest.raises(MemoryBudgetError, match=re.escape("a weight budget of 1.0 kB is too small: streaming needs "
                                                          "room for the largest unit, layer 0, of")):
        load_runtime(tiny_models["llama"], max_memory=1000)


def test_memory_budget_streams_and_gives_the_same_tokens(artifacts):
    full = load_runtime(artifacts["sym4"])
    ids = full.tokenizer("The state of the union")["input_ids"]
    want = [s.token for s in generate(full.model, full.tokenizer, ids, 16, ignore_eos=True)]
    budget = full.model.weight_bytes()["per_token"] * 6 // 10
    lm = load_runtime(artifacts["sym4"], max_memory=budget)
    wb = lm.model.weight_bytes()
    assert wb["resident"] <= budget and wb["streamed_per_token"] > 0
    assert [s.token for s in generate(lm.model, lm.tokenizer, ids, 16, ignore_eos=True)] == want


def test_run_cli_streams_text(tiny_models, capsys):
    assert main(["run", str(tiny_models["llama"]), "-p", "The economy", "-n", "8", "--ignore-eos", "--raw"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "8 generated" in err


@pytest.mark.parametrize("threads", [2, 4])
def test_decoding_past_256_positions_matches_one_pass(artifacts, threads):
    """Long contexts take the multi-threaded attention branch of the fused decode step: by kv group (2 groups of 2
    heads), and at 4 threads each group's heads split in two parts."""
    lm = load_runtime(artifacts["sym4"])
    ids = torch.randint(5, 300, (1, 300), generator=torch.Generator().manual_seed(0))
    whole = lm.model(ids).logits[0, -3:]
    cache = lm.model.new_cache(1, 300)
    lm.model.forward(ids[:, :297], 0, cache)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps = torch.cat([lm.model.forward(ids[:, i:i + 1], i, cache)[0] for i in range(297, 300)])
    finally:
        torch.set_num_threads(before)
    assert kld(whole, steps) < 1e-3


def test_artifact_with_a_format_the_runtime_lacks_is_a_typed_error(artifacts, tmp_path):
    import json
    import shutil

    from tightfit.errors import ArtifactError

    bad = tmp_path / "bad"
    shutil.copytree(artifacts["sym4"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["tensors"]["model.layers.0.mlp.up_proj.weight"]["format"] = "nf4-g64"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=re.escape("tensor model.layers.0.mlp.up_proj.weight has an unknown "
                                                      "format 'nf4-g64'")):
        load_runtime(bad)


@pytest.mark.parametrize("source,kv", [("bf16", "bf16"), ("sym4", "bf16"), ("sym4", "int8")])
def test_batched_decode_rows_match_each_sequence_alone(tiny_models, artifacts, source, kv):
    """The server's step: sequences at different positions in their own caches, one call (C attention for float
    caches, torch per row for int8)."""
    lm = load_runtime(tiny_models["llama"] if source == "bf16" else artifacts[source], kv_format=kv)
    e = lm.model
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 40, 300)]
    caches = [e.new_cache(1, 320) for _ in prompts]
    for c, p in zip(caches, prompts):
        e.forward(torch.tensor([p]), 0, c)
    rows = e.decode_rows([11, 12, 13], [len(p) for p in prompts], caches)
    for b, p in enumerate(prompts):
        c = e.new_cache(1, 320)
        e.forward(torch.tensor([p]), 0, c)
        e._fused = None  # the unfused single-sequence path: the same linears as the batch
        alone = e.forward(torch.tensor([[11 + b]]), len(p), c)[0, -1]
        if source == "bf16":
            assert torch.equal(alone, rows[b])
        else:
            assert kld(alone[None], rows[b][None]) < 1e-3


def test_loading_the_kernel_leaves_the_process_floating_point_mode_alone():
    """A library linked with -ffast-math turns on flush-to-zero process-wide when it loads (found by fuzzing:
    hypothesis could no longer draw subnormal floats)."""
    import numpy as np

    if library() is None:
        pytest.skip("no kernel here")
    assert float((np.array([1e-310]) * 1.0)[0]) == 1e-310
    assert float((torch.tensor([1e-40], dtype=torch.float32) * 1.0)[0]) > 0


def test_kernel_cache_survives_two_compilers_at_once_and_a_corrupt_library(tmp_path):
    import subprocess
    import sys

    if library() is None:
        pytest.skip("no kernel here")
    probe = ("import torch\nfrom tightfit.runtime.kernels import library\nlib = library()\n"
             "from tightfit.formats import WeightFormat\nfrom tightfit.quant.core import rtn\n"
             "from tightfit.runtime.linear import from_quantized\n"
             "w = torch.randn(64, 128)\nlin = from_quantized(rtn(w, WeightFormat(4, 32, False)))\n"
             "y = lin(torch.randn(2, 128))\nprint('ok' if lib is not None and torch.isfinite(y).all() else 'no')\n")
    env = {**__import__("os").environ, "TIGHTFIT_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["ok", "ok"]
    (so,) = (tmp_path / "kernels").glob("qgemm-*.so")
    assert not [p for p in (tmp_path / "kernels").iterdir() if p != so]  # no temporary folder left
    so.write_bytes(b"\x7fELF not really a library")
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok" and "could not be loaded" in r.stderr and "rebuilding it" in r.stderr
