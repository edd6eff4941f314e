import copy
import json
import math

import pytest
import torch

import tightfit
from tightfit.cli import main
from tightfit.data import EVALUATION, sha256_text
from tightfit.eval import evaluate
from tightfit.eval.windows import adds_bos, make_windows, tokenize

from .conftest import ARCHS

CTX = 64


def run_eval(model, text, base=None, chunks=None):
    return evaluate(model, text, text_name="t", text_sha256=sha256_text(text), ctx=CTX, chunks=chunks, base=base)


@pytest.mark.parametrize("arch", ARCHS)
def test_self_comparison_is_zero(tiny_models, arch, short_eval_text):
    a, b = tightfit.load(tiny_models[arch]), tightfit.load(tiny_models[arch])
    r = run_eval(a, short_eval_text, base=b)
    assert r.kld_mean == 0 and r.kld_max == 0 and r.top1_agreement == 1.0
    assert r.perplexity == r.base_perplexity and r.perplexity_ratio == 1.0


def brute_force(model, base, text, ctx):
    """KL(P_base || P_model), NLL and top-1 from full forward passes in float64, written independently of tightfit."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=True).input_ids  # the tokenizer's own BOS setting
    klds, nll, base_nll, same = [], [], [], []
    for start in range(0, (len(ids) // ctx) * ctx, ctx):
        window = ids[start:start + ctx]
        if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
            window[0] = tok.bos_token_id
        x = torch.tensor([window])
        with torch.no_grad():
            q = torch.softmax(model.model(x).logits[0].double(), -1)
            p = torch.softmax(base.model(x).logits[0].double(), -1)
        for pos in range(ctx // 2, ctx - 1):
            klds.append(float((p[pos] * (p[pos].log() - q[pos].log())).sum()))
            nll.append(-math.log(float(q[pos, window[pos + 1]])))
            base_nll.append(-math.log(float(p[pos, window[pos + 1]])))
            same.append(int(p[pos].argmax() == q[pos].argmax()))
    k = torch.tensor(klds, dtype=torch.float64)
    return dict(kld_mean=float(k.mean()), kld_median=float(torch.quantile(k, 0.5)), kld_p99=float(torch.quantile(k, 0.99)),
                kld_max=float(k.max()), top1_agreement=sum(same) / len(same), tokens_scored=len(klds),
                perplexity=math.exp(sum(nll) / len(nll)), base_perplexity=math.exp(sum(base_nll) / len(base_nll)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kld_equals_brute_force_on_perturbed_model(tiny_models, arch, short_eval_text):
    base = tightfit.load(tiny_models[arch])
    model = copy.copy(base)
    model.model = copy.deepcopy(base.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.05)
    r = run_eval(model, short_eval_text, base=base)
    ref = brute_force(model, base, short_eval_text, CTX)
    assert r.tokens_scored == ref["tokens_scored"]
    assert 0.01 < r.kld_mean < 5  # a real, non-trivial divergence
    for key in ("kld_mean", "kld_median", "kld_p99", "kld_max", "perplexity", "base_perplexity"):
        assert getattr(r, key) == pytest.approx(ref[key], rel=2e-4, abs=1e-6), key
    assert r.top1_agreement == pytest.approx(ref["top1_agreement"], abs=2 / ref["tokens_scored"])
    assert 0 < r.top1_agreement < 1


def test_windows_follow_llama_perplexity(tiny_models, short_eval_text):
    lm = tightfit.load(tiny_models["llama"])  # this tiny tokenizer adds BOS
    assert adds_bos(lm.tokenizer)
    ids = tokenize(lm.tokenizer, short_eval_text)
    assert ids[0] == lm.tokenizer.bos_token_id and ids[-1] != lm.tokenizer.eos_token_id
    w = make_windows(ids, CTX, bos=lm.tokenizer.bos_token_id)
    assert w.tokens.shape == (len(ids) // CTX, CTX) and w.n_available == len(ids) // CTX
    assert (w.tokens[:, 0] == lm.tokenizer.bos_token_id).all()
    assert w.tokens[1, 1:].tolist() == ids[CTX + 1:2 * CTX]
    assert w.first == 32 and w.scored_per_window == 31 and w.targets(0).tolist() == ids[33:64]
    assert make_windows(ids, CTX, chunks=3).tokens.shape[0] == 3


def test_no_bos_when_the_tokenizer_adds_none(tiny_models, short_eval_text):
    lm = tightfit.load(tiny_models["qwen2"])
    assert not adds_bos(lm.tokenizer)
    assert tokenize(lm.tokenizer, short_eval_text) == lm.tokenizer(short_eval_text, add_special_tokens=False).input_ids


def test_chunks_limit_and_tokens_scored(tiny_models, short_eval_text):
    lm = tightfit.load(tiny_models["qwen2"])
    r = run_eval(lm, short_eval_text, chunks=2)
    assert r.chunks == 2 and r.tokens_scored == 2 * (CTX - 1 - CTX // 2) and r.chunks_available > 2


def test_cli_json(tiny_models, tmp_path, capsys, short_eval_text):
    text = tmp_path / "t.txt"
    text.write_text(short_eval_text)
    m = str(tiny_models["llama"])
    assert main(["eval", m, "--base", m, "--text", str(text), "--ctx", str(CTX), "--chunks", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    for key in ("perplexity", "tokens_scored", "ctx", "chunks", "text_sha256", "model", "base", "base_perplexity",
                "kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agreement"):
        assert key in r, key
    assert r["ctx"] == CTX and r["chunks"] == 3 and r["text_sha256"] == sha256_text(short_eval_text)
    assert r["kld_mean"] == 0 and r["top1_agreement"] == 1.0
    assert "evaluating" not in err  # quiet under --json


def test_default_text_is_the_evaluation_part(tiny_models, capsys):
    assert main(["eval", str(tiny_models["qwen2"]), "--ctx", "256", "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["text_sha256"] == EVALUATION.sha256 and r["text"].endswith("sotu-eval-2016-2021.txt")


def test_shipped_texts_match_their_hashes():
    from tightfit.data import CALIBRATION, read_part

    for part in (CALIBRATION, EVALUATION):
        assert sha256_text(read_part(part)) == part.sha256
        assert part.path.read_bytes().decode("utf-8") == read_part(part)


def test_models_lists_named_models_and_folders(tiny_models, tmp_path, capsys):
    from tightfit.export.gguf import write_gguf_f16
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    write_gguf_f16(tightfit.load(tiny_models["llama"]), tmp_path / "m.gguf")
    quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, False)), tmp_path / "art")
    assert main(["models", str(tiny_models["qwen2"].parent), str(tmp_path), "--json"]) == 0
    found = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert "smollm2-135m" in found
    assert found[str(tmp_path / "m.gguf")]["format"] == "gguf" and "F16" in found[str(tmp_path / "m.gguf")]["detail"]
    assert found[str(tiny_models["qwen2"])]["format"] == "hf"
    assert found[str(tmp_path / "art")]["format"] == "artifact" and "rtn" in found[str(tmp_path / "art")]["detail"]
    assert main(["models", str(tmp_path / "nope")]) == 2
