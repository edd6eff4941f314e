"""Calibration windows written by the model itself, and their mix with the shipped text."""

from __future__ import annotations

import json

import pytest
import torch

import tightfit
from tightfit.data import CALIBRATION, read_part
from tightfit.errors import QuantizeError
from tightfit.formats.weight import WeightFormat
from tightfit.quant import selfgen
from tightfit.quant.api import calibration_ids, interleave, quantize
from tightfit.quant.config import QuantConfig

CTX = 64


def test_generated_windows_are_conversations_the_model_writes(tiny_models, monkeypatch):
    from tightfit.runtime.load import load_engine

    engine, tok, _, _ = load_engine(tiny_models["qwen2"])
    eos = tok.convert_tokens_to_ids("</s>")
    real_forward = engine.forward
    calls = []

    def forward(tokens, pos, cache, logits_to_keep=1):  # a model whose answers end at once
        calls.append(tokens.shape)
        logits = real_forward(tokens, pos, cache, logits_to_keep).clone()
        logits[:, -1] = -1e9
        logits[:, -1, eos] = 0
        return logits

    monkeypatch.setattr(engine, "forward", forward)
    ctx = 2 * max(len(selfgen.conversation(tok, p)) for p in selfgen.PROMPTS) + 2
    ids = selfgen.generate_windows(engine, tok, 3, ctx, seed=5)
    assert ids.shape == (3, ctx) and ids.dtype == torch.long
    assert all(s == (3, 1) for s in calls) and len(calls) == ctx - 1  # one batched step per position
    convs = [selfgen.conversation(tok, p) for p in selfgen.PROMPTS]
    for row in ids.tolist():
        first = [c for c in convs if row[:len(c)] == c]
        assert len(first) == 1  # the window opens with one instruction through the chat template
        rest = row[len(first[0]):]
        assert rest[0] == eos  # the model's (empty) answer
        assert [c for c in convs if rest[1:1 + len(c)] == c], "the next conversation follows in the same window"
    monkeypatch.setattr(engine, "forward", real_forward)
    a, b = (selfgen.generate_windows(engine, tok, 3, CTX, seed=5) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, selfgen.generate_windows(engine, tok, 3, CTX, seed=6))


def test_generated_windows_are_cached_per_source(tiny_models, monkeypatch, _calibration_cache):
    first = selfgen.generated_windows(tiny_models["llama"], 2, CTX, seed=1)
    assert list(_calibration_cache.glob("*.pt"))

    def no_engine(*a, **k):
        raise AssertionError("the cached windows were not reused")

    monkeypatch.setattr("tightfit.runtime.load.load_engine", no_engine)
    assert torch.equal(selfgen.generated_windows(tiny_models["llama"], 2, CTX, seed=1), first)
    with pytest.raises(AssertionError, match="not reused"):  # another seed is another entry
        selfgen.generated_windows(tiny_models["llama"], 2, CTX, seed=2)


def test_mix_spreads_generated_windows_over_fitted_and_held_out_parts():
    text, gen = torch.zeros(30, 4, dtype=torch.long), torch.ones(10, 4, dtype=torch.long)
    mixed = interleave(text, gen)
    is_gen = mixed[:, 0].bool()
    assert int(is_gen.sum()) == 10 and mixed.shape == (40, 4)
    held = QuantConfig().held_out_windows(40)  # the last 5 windows
    assert 1 <= int(is_gen[-held:].sum()) <= 2 and int(is_gen[:-held].sum()) >= 8
    assert torch.equal(interleave(text, gen[:0]), text)


def test_quantize_records_the_mix(tiny_models, tmp_path):
    cfg = QuantConfig(method="gptq", fmt=WeightFormat(4, 32, False), calib_samples=8, calib_ctx=CTX)
    m = quantize(tiny_models["llama"], cfg, tmp_path / "mix")
    assert m["calibration"]["generated_windows"] == 2 and m["calibration"]["samples"] == 8
    text_only = quantize(tiny_models["llama"], QuantConfig(method="gptq", fmt=WeightFormat(4, 32, False),
                                                           calib_samples=8, calib_ctx=CTX, calib_generated=0),
                         tmp_path / "text")
    assert text_only["calibration"]["generated_windows"] == 0
    w = lambda p: tightfit.load(p).model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(w(tmp_path / "mix"), w(tmp_path / "text"))  # the generated windows were fitted
    on_disk = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert on_disk["config"]["calib_generated"] == 0.25


def test_bad_generated_share():
    with pytest.raises(QuantizeError, match=r"generated share .* must be in \[0, 1\).*--calib-generated"):
        QuantConfig(calib_generated=1.0)


def test_a_model_the_runtime_cannot_run_is_calibrated_on_text_and_says_so(tiny_models, monkeypatch):
    from tightfit.errors import UnsupportedArchitectureError
    from tightfit.quant.api import calibration_mix

    def refuse(*a, **k):
        raise UnsupportedArchitectureError("the runtime runs model types ['llama', 'qwen2']; got 'x'")

    monkeypatch.setattr(selfgen, "generated_windows", refuse)
    lm = tightfit.load(tiny_models["llama"])
    ids, info = calibration_mix(tiny_models["llama"], lm.tokenizer, read_part(CALIBRATION),
                                QuantConfig(calib_samples=8, calib_ctx=CTX))
    assert ids.shape == (8, CTX) and info["generated_windows"] == 0
    assert "runtime runs model types" in info["generated_skipped"]
    assert torch.equal(ids, calibration_ids(lm.tokenizer, read_part(CALIBRATION), 8, CTX))
