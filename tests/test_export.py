import json
import re

import pytest

import tightfit
from tightfit.cli import main
from tightfit.data import sha256_text
from tightfit.errors import FormatError
from tightfit.eval import evaluate
from tightfit.export.gguf_quant import export_gguf
from tightfit.formats import WeightFormat
from tightfit.formats.size import gguf_bits_per_weight
from tightfit.quant.api import quantize
from tightfit.quant.config import QuantConfig

CTX = 64


def kld_vs(lm, base, text):
    return evaluate(lm, text, text_name="t", text_sha256=sha256_text(text), ctx=CTX, base=base)


@pytest.mark.parametrize("arch,fmt", [("llama", WeightFormat(4, 32, False)), ("qwen2", WeightFormat(4, 32, True)),
                                      ("llama", WeightFormat(5, 32, True)), ("qwen2", WeightFormat(5, 32, False))],
                         ids=lambda x: getattr(x, "name", x))
def test_exact_formats_round_trip_through_gguf(tiny_models, tmp_path, short_eval_text, arch, fmt):
    quantize(tiny_models[arch], QuantConfig(method="gptq", fmt=fmt, calib_samples=4, calib_ctx=CTX), tmp_path / "a")
    report = export_gguf(tmp_path / "a", tmp_path / "a.gguf")
    assert report["exact"] and {r["ggml_type"] for r in report["tensors"].values()} == {fmt.ggml_type, "Q8_0", "F32"}
    # one size function: the GGUF file and the artifact store the same bytes
    assert gguf_bits_per_weight(tmp_path / "a.gguf") == pytest.approx(report["artifact_bits_per_weight"])
    r = kld_vs(tightfit.load(tmp_path / "a.gguf"), tightfit.load(tmp_path / "a"), short_eval_text)
    assert r.kld_max < 1e-4 and r.top1_agreement == 1.0


def test_inexact_format_warns_with_added_error_or_fails_strict(tiny_models, tmp_path, caplog):
    quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=WeightFormat(3, 32, False)), tmp_path / "a")
    with pytest.raises(FormatError, match=re.escape("model.layers.0.self_attn.q_proj.weight: asym3-g32 has no GGML "
                                                    "type; re-quantized to Q4_0, adding relative error")):
        export_gguf(tmp_path / "a", tmp_path / "strict.gguf", strict=True)
    assert not (tmp_path / "strict.gguf").exists()
    report = export_gguf(tmp_path / "a", tmp_path / "a.gguf")
    q = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert not q["exact"] and q["ggml_type"] == "Q4_0" and 0 < q["added_rel_mse"] < 0.05
    assert "re-quantized to Q4_0" in caplog.text
    assert report["bits_per_weight"] > report["artifact_bits_per_weight"]  # 4.5-bit blocks for 4-bit codes


def test_export_cli(tiny_models, tmp_path, capsys):
    quantize(tiny_models["qwen2"], QuantConfig(method="rtn", fmt=WeightFormat(8, 32, True)), tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "-o", str(tmp_path / "a.gguf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"]
    assert main(["export", str(tmp_path / "a"), "-o", str(tmp_path / "a.gguf")]) == 2
    assert "already exists; choose another output path or pass --force" in capsys.readouterr().err
    assert main(["export", str(tiny_models["qwen2"]), "-o", str(tmp_path / "b.gguf")]) == 2
    assert "is not a tightfit artifact (no manifest.json)" in capsys.readouterr().err


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(ids).logits.float()


@pytest.mark.parametrize("fmt,g_idx", [("sym4-g32", False), ("sym8-pc", False), ("sym4-g32", True)])
def test_compressed_tensors_export_loads_in_transformers(tiny_models, tmp_path, fmt, g_idx):
    import torch
    from transformers import AutoModelForCausalLM

    from tightfit.export.compressed_tensors import export_compressed_tensors
    from tightfit.runtime import load_runtime

    cfg = QuantConfig(method="gptq" if g_idx else "rtn", fmt=WeightFormat.parse(fmt), static_groups=not g_idx,
                      calib_samples=4, calib_ctx=CTX)
    quantize(tiny_models["llama"], cfg, tmp_path / "a")
    report = export_compressed_tensors(tmp_path / "a", tmp_path / "ct")
    assert report["exact"] != g_idx  # act-order groups are re-quantized, with their added error reported
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["architectures"] == ["LlamaForCausalLM"]  # vLLM picks its model class by it
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    want = _logits(tightfit.load(tmp_path / "a").model, ids)  # the artifact's own weights, fp32
    got = _logits(ct, ids)
    if g_idx:  # re-quantized in plain column order: it loads, and the report carries what that cost
        errs = [r["added_error"]["sqnr_db"] for r in report["tensors"].values() if not r["exact"] and "added_error" in r]
        assert errs and torch.isfinite(got).all()
        return
    # exact codes and scales; fp16 dequantization in compressed-tensors: logits within 1% of their range
    assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())
    rt = load_runtime(tmp_path / "a").model(ids).logits  # tightfit's runtime (int8 activations)
    assert float((got - rt).abs().max()) < 0.05 * float(want.abs().max())


def test_compressed_tensors_asymmetric_warns_or_fails_strict_and_warns_about_vllm(tiny_models, tmp_path, caplog):
    from tightfit.export.compressed_tensors import export_compressed_tensors

    quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, False)), tmp_path / "a")
    with pytest.raises(FormatError, match=re.escape("model.layers.0.self_attn.q_proj.weight: asym4-g32 stores a "
                                                    "float minimum, which compressed-tensors cannot hold")):
        export_compressed_tensors(tmp_path / "a", tmp_path / "ct", strict=True)
    assert not (tmp_path / "ct").exists()
    report = export_compressed_tensors(tmp_path / "a", tmp_path / "ct")
    r = report["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert not r["exact"] and r["format"] == "sym4-g32" and 5 < r["added_error"]["sqnr_db"] < 40
    # the tiny model's shapes are below what vLLM's Marlin kernels take, and 4 heads do not split 8 ways
    assert any("input dim 64 not a multiple of 128" in w for w in report["warnings"])
    assert any(w.startswith("--tensor-parallel-size 8: 4 attention heads are not divisible by 8") for w in
               report["warnings"])
    assert main(["export", str(tmp_path / "a"), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 2
