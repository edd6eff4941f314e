"""The residual-stream rotation folded into the weights (tightfit convert --rotate): the function is kept, outlier
columns go, and the rotated model quantizes better at the same bits."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tightfit
from tightfit.cli import main
from tightfit.data import sha256_text
from tightfit.errors import UnsupportedArchitectureError
from tightfit.eval import evaluate

CTX = 64


def kld(lm, base, text):
    return evaluate(lm, text, text_name="t", text_sha256=sha256_text(text), ctx=CTX, base=base)


def test_random_orthogonal_is_orthogonal():
    from tightfit.quant.rotate import random_orthogonal

    q = random_orthogonal(96, seed=3)
    assert float((q @ q.T - torch.eye(96, dtype=torch.float64)).abs().max()) < 1e-12
    assert not torch.equal(q, random_orthogonal(96, seed=4))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotation_keeps_the_function_and_unties_the_head(tiny_models, tmp_path, short_eval_text, arch, capsys):
    out = tmp_path / "rot"
    assert main(["convert", str(tiny_models[arch]), "--rotate", "-o", str(out)]) == 0
    assert "the tied embedding/head becomes two tensors" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    rotated, base = tightfit.load(out), tightfit.load(tiny_models[arch])
    sd = rotated.model.state_dict()
    assert torch.equal(sd["model.layers.0.input_layernorm.weight"], torch.ones_like(sd["model.norm.weight"]))
    r = kld(rotated, base, short_eval_text)
    assert r.kld_mean < 1e-6 and r.top1_agreement == 1.0  # fp32 weights: the same function to rounding


def outlier_model(tiny_models, tmp_path):
    """The tiny Llama with a few input columns of q/k/v and gate/up made 20x larger and the norm gains of those
    channels 20x smaller: the same function, weights with outlier columns (what massive activations leave)."""
    from tightfit.models.families import family_of
    from tightfit.quant.equivalence import apply_scale

    lm = tightfit.load(tiny_models["llama"])
    state = lm.model.state_dict()
    s = torch.ones(lm.config.hidden_size)
    s[[3, 17, 40]] = 20.0
    with torch.no_grad():
        for i in range(lm.config.num_hidden_layers):
            for pair in family_of(lm.config).pairs:
                if pair.name in ("attn_in", "mlp_in"):
                    apply_scale(state, f"model.layers.{i}.", pair, s, lm.config)
    lm.model.save_pretrained(tmp_path / "outliers")
    lm.tokenizer.save_pretrained(tmp_path / "outliers")
    return tmp_path / "outliers"


def test_a_rotated_model_quantizes_better_at_the_same_bits(tiny_models, tmp_path, short_eval_text):
    from tightfit.formats.weight import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    src = outlier_model(tiny_models, tmp_path)
    assert main(["convert", str(src), "--rotate", "-o", str(tmp_path / "rot")]) == 0
    base = tightfit.load(src)
    cfg = QuantConfig(method="rtn", fmt=WeightFormat(3, 32, False), embed_fmt=WeightFormat(8, 32, True))
    quantize(src, cfg, tmp_path / "plain")
    quantize(tmp_path / "rot", cfg, tmp_path / "rotated")
    plain = kld(tightfit.load(tmp_path / "plain"), base, short_eval_text).kld_mean
    rotated = kld(tightfit.load(tmp_path / "rotated"), base, short_eval_text).kld_mean
    print("rtn asym3-g32 kld plain", plain, "rotated", rotated)
    assert rotated < 0.5 * plain, (rotated, plain)


def test_families_a_rotation_does_not_commute_with_are_refused(tiny_models, tmp_path, capsys):
    from tightfit.quant.rotate import check_rotatable

    with pytest.raises(UnsupportedArchitectureError, match=re.escape(
            "gemma3_text: its norms on the attention/MLP outputs (sandwich norms) do not commute with a rotation")):
        check_rotatable(tightfit.load(tiny_models["gemma3_text"]).config)
    assert main(["convert", str(tiny_models["llama"]), "--rotate", "--to", "gguf-f16", "-o",
                 str(tmp_path / "x.gguf")]) == 2
    assert "--rotate writes a Hugging Face folder (--to hf)" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
