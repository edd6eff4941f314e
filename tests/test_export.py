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
