import itertools
import re

import numpy as np
import pytest

import tightfit
from tightfit.data import sha256_text
from tightfit.errors import QuantizeError
from tightfit.eval import evaluate
from tightfit.formats import WeightFormat
from tightfit.quant.api import quantize
from tightfit.quant.config import QuantConfig
from tightfit.quant.mixed import Sensitivity, budget_for, choose, plan_mixed

CTX = 64


def test_milp_equals_brute_force():
    rng = np.random.default_rng(0)
    fmts = [WeightFormat(b, 32, False) for b in (2, 3, 4)]
    for trial in range(5):
        T = 5
        nbytes = np.array([[2, 3, 4]] * T) * rng.integers(1, 5, size=(T, 1))
        loss = rng.random((T, 3)) * np.array([8, 2, 0.5])
        sens = Sensitivity([f"t{i}" for i in range(T)], fmts, loss, nbytes, np.ones(T))
        budget = float(nbytes[:, 1].sum())
        plan, total = choose(sens, budget)
        best = min((sum(loss[t, k] for t, k in enumerate(c)), c) for c in itertools.product(range(3), repeat=T)
                   if sum(nbytes[t, k] for t, k in enumerate(c)) <= budget)
        assert total == pytest.approx(best[0])
        assert sum(nbytes[t, fmts.index(plan[f"t{t}"])] for t in range(T)) <= budget


def test_target_below_any_format():
    fmts = [WeightFormat(2, 64, True), WeightFormat(4, 32, False)]
    sens = Sensitivity(["a"], fmts, np.array([[1.0, 0.1]]), np.array([[40, 80]]), np.array([128]))
    with pytest.raises(QuantizeError, match=re.escape("target 1.5 bits per weight is below what any format allows "
                                                      "here: the smallest formats give 2.500")):
        budget_for(sens, 1.5, 0, 0)


def kld(lm, base, text):
    return evaluate(lm, text, text_name="t", text_sha256=sha256_text(text), ctx=CTX, base=base).kld_mean


def test_mixed_beats_uniform_at_the_same_size(tiny_models, tmp_path, short_eval_text):
    src = tiny_models["llama"]
    uniform_cfg = QuantConfig(method="rtn", fmt=WeightFormat(3, 32, False), embed_fmt=WeightFormat(3, 32, False))
    uniform = quantize(src, uniform_cfg, tmp_path / "u")
    target = uniform["bits_per_weight"]
    cfg = plan_mixed(src, QuantConfig(method="rtn", calib_ctx=CTX), target, fisher_windows=8)
    assert cfg.predicted_kld > 0 and len(set(cfg.tensor_formats.values())) > 1
    mixed = quantize(src, cfg, tmp_path / "m")
    assert mixed["bits_per_weight"] <= target + 1e-9
    base = tightfit.load(src)
    k_mixed, k_uniform = kld(tightfit.load(tmp_path / "m"), base, short_eval_text), kld(tightfit.load(tmp_path / "u"), base, short_eval_text)
    assert k_mixed < k_uniform, (k_mixed, k_uniform)


def test_fisher_proxy_ranks_like_the_true_kld(tiny_models, short_eval_text):
    import copy

    import torch
    from scipy.stats import spearmanr

    from tightfit.data import CALIBRATION, read_part
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.core import rtn
    from tightfit.quant.mixed import fisher_diagonal, sensitivities

    base = tightfit.load(tiny_models["qwen2"])
    lm = copy.copy(base)
    lm.model = copy.deepcopy(base.model)
    ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), 16, CTX, seed=1)
    sens = sensitivities(lm.model, fisher_diagonal(lm.model, ids))
    rng = np.random.default_rng(0)
    cols = [k for k, f in enumerate(sens.formats) if f.group_size == 32 and not f.symmetric and f.bits <= 4
            and not f.superblock]  # the tiny model's 64-wide rows take no super-block format
    state = lm.model.state_dict()
    predicted, measured = [], []
    for _ in range(16):
        t, k = int(rng.integers(len(sens.names))), int(rng.choice(cols))
        name = sens.names[t]
        keep = state[name].clone()
        with torch.no_grad():
            state[name].copy_(rtn(keep, sens.formats[k]).dequantize())
        measured.append(kld(lm, base, short_eval_text))
        with torch.no_grad():
            state[name].copy_(keep)
        predicted.append(sens.loss[t, k])
    assert spearmanr(predicted, measured).statistic >= 0.8


def test_method_aware_proxy_ranks_like_the_true_kld_of_gptq(tiny_models, short_eval_text):
    """The proxy prices each (tensor, format) by RTN's Fisher-weighted error times GPTQ's output error over RTN's;
    it must rank (tensor, format) pairs as the KLD of GPTQ-quantizing that one tensor does, and predict its size."""
    import copy

    import torch
    from scipy.stats import spearmanr

    from tightfit.data import CALIBRATION, read_part
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.gptq import gptq
    from tightfit.quant.mixed import (
        fisher_diagonal,
        held_out_pair,
        input_hessians,
        method_ratios,
        sensitivities,
    )

    base = tightfit.load(tiny_models["qwen2"])
    lm = copy.copy(base)
    lm.model = copy.deepcopy(base.model)
    ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), 16, CTX, seed=1)
    with input_hessians(lm.model) as hooks:
        fisher = fisher_diagonal(lm.model, ids)
    H = {n: h.result() for n, h in hooks.items()}
    cfg = QuantConfig(method="gptq")
    fit, test = held_out_pair(hooks)
    ratios = method_ratios(lm.model, fit, cfg, held_out=test)
    assert method_ratios(lm.model, H, QuantConfig(method="rtn")) == {}
    assert "model.embed_tokens.weight" in ratios and "lm_head.weight" not in ratios  # tied: one item
    r = np.array([v for d in ratios.values() for v in d.values()])
    assert np.median(r) < 0.8 and (r < 1.0 + 1e-6).mean() > 0.9, np.percentile(r, [10, 50, 90])
    sens, plain = sensitivities(lm.model, fisher, ratios=ratios), sensitivities(lm.model, fisher)
    assert (sens.loss[np.isfinite(sens.loss)] < plain.loss[np.isfinite(plain.loss)]).mean() > 0.9
    rng = np.random.default_rng(0)
    cols = [k for k, f in enumerate(sens.formats) if f.group_size == 32 and not f.symmetric and f.bits <= 4
            and not f.superblock]  # the tiny model's 64-wide rows take no super-block format
    linears = [t for t, n in enumerate(sens.names) if n in H]
    state = lm.model.state_dict()
    predicted, measured, plain_pred = [], [], []
    for _ in range(16):
        t, k = int(rng.choice(linears)), int(rng.choice(cols))
        name = sens.names[t]
        keep = state[name].clone()
        with torch.no_grad():
            state[name].copy_(gptq(keep, H[name], sens.formats[k]).dequantize())
        measured.append(kld(lm, base, short_eval_text))
        with torch.no_grad():
            state[name].copy_(keep)
        predicted.append(sens.loss[t, k])
        plain_pred.append(plain.loss[t, k])
    assert spearmanr(predicted, measured).statistic >= 0.8
    # and in magnitude: here 0.95x the measured KLD, where RTN's pricing says 1.9x
    scale, plain_scale = np.median(np.divide(predicted, measured)), np.median(np.divide(plain_pred, measured))
    assert 0.67 < scale < 1.5 and abs(np.log(scale)) < abs(np.log(plain_scale)), (scale, plain_scale)
