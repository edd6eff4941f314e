"""The layer-by-layer passes compute what the whole model computes: the mixed-precision proxy (Fisher, input
Hessians, method ratios) and the base of a KL-divergence evaluation."""

import numpy as np
import pytest
import torch

import tightfit
from tightfit.data import CALIBRATION, read_part
from tightfit.quant.config import QuantConfig

CTX = 64


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layerwise_fisher_matches_the_full_model_backward(tiny_models, arch):
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.mixed import fisher_diagonal, priced_sensitivities, sensitivities

    lm = tightfit.load(tiny_models[arch])
    ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), 6, CTX, seed=1)
    full = sensitivities(lm.model, fisher_diagonal(lm.model, ids, seed=0))
    layered, ratios, _ = priced_sensitivities(lm, ids, QuantConfig(method="rtn", seed=0))
    assert ratios == {}
    assert layered.names == full.names and (layered.nbytes == full.nbytes).all()
    ok = np.isfinite(full.loss)
    assert (np.isfinite(layered.loss) == ok).all()
    np.testing.assert_allclose(layered.loss[ok], full.loss[ok], rtol=1e-3)


def test_layerwise_method_ratios_match_the_full_model_hooks(tiny_models):
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.mixed import fisher_diagonal, held_out_pair, input_hessians, method_ratios, \
        priced_sensitivities

    lm = tightfit.load(tiny_models["qwen2"])
    ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), 6, CTX, seed=1)
    cfg = QuantConfig(method="gptq")
    with input_hessians(lm.model) as hooks:
        fisher_diagonal(lm.model, ids)
    fit, test = held_out_pair(hooks)
    full = method_ratios(lm.model, fit, cfg, held_out=test)
    _, layered, H = priced_sensitivities(lm, ids, cfg, keep_hessians=True)
    assert set(layered) == set(full)
    for n in full:  # rows are sampled in another order: compare the medians over formats
        a, b = np.median(list(full[n].values())), np.median(list(layered[n].values()))
        assert a == pytest.approx(b, rel=0.35), n
    torch.testing.assert_close(H["model.layers.1.mlp.down_proj.weight"],
                               hooks["model.layers.1.mlp.down_proj.weight"].result(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_base_scores_as_the_whole_model(tiny_models, short_eval_text, arch):
    from tightfit.eval import evaluate
    from tightfit.eval.reference import StreamedReference, load_reference

    whole = tightfit.load(tiny_models[arch])
    streamed = load_reference(str(tiny_models[arch]))
    assert isinstance(streamed, StreamedReference)
    kw = dict(text_name="t", text_sha256="x", ctx=CTX, chunks=6)
    a = evaluate(whole, short_eval_text, base=whole, **kw)
    b = evaluate(whole, short_eval_text, base=streamed, **kw)
    c = evaluate(streamed, short_eval_text, base=whole, **kw)
    assert a.kld_mean == 0 and b.kld_mean < 1e-9 and c.kld_mean < 1e-9
    assert b.base_perplexity == pytest.approx(a.base_perplexity, rel=1e-5)
    assert c.perplexity == pytest.approx(a.perplexity, rel=1e-5) and c.extra["runner"] == "layered"
