"""The real default model (SmolLM2-135M-Instruct), a few windows of the evaluation text, and llama.cpp beside it."""

import copy

import pytest
import torch

import tightfit
from tightfit.data import EVALUATION, read_part
from tightfit.eval import evaluate
from tightfit.eval.windows import make_windows, tokenize
from tightfit.export.gguf import write_gguf_f16
from tightfit.models.hf import save_hf

from .conftest import require_default_model, require_llama_cpp

pytestmark = pytest.mark.real
CHUNKS = 2


@pytest.fixture(scope="module")
def smollm():
    require_default_model()
    return tightfit.load("smollm2-135m")


@pytest.fixture(scope="module")
def text():
    return read_part(EVALUATION)


def run(lm, text, base=None):
    return evaluate(lm, text, text_name="eval", text_sha256=EVALUATION.sha256, ctx=512, chunks=CHUNKS, base=base)


@pytest.fixture(scope="module")
def smollm_result(smollm, text):
    return run(smollm, text)


def test_default_model_loads_as_llama(smollm):
    c = smollm.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert c.tie_word_embeddings and smollm.format == "gguf"


def test_default_model_perplexity(smollm_result):
    r = smollm_result
    assert r.tokens_scored == CHUNKS * 255 and r.chunks_available == 88
    assert 10 < r.perplexity < 40


def test_tokenization_matches_llama_cpp(smollm, text):
    require_llama_cpp()
    from tightfit.eval import llama_cpp

    llm = llama_cpp.open_llama(smollm.path, ctx=64)
    try:
        assert llama_cpp.tokenize(llm, text, add_bos=False) == tokenize(smollm.tokenizer, text)
    finally:
        llm.close()


def test_perplexity_agrees_with_llama_cpp(smollm, text, smollm_result):
    require_llama_cpp()
    from tightfit.eval import llama_cpp

    windows = make_windows(tokenize(smollm.tokenizer, text), 512, CHUNKS)
    peer = llama_cpp.perplexity(smollm.path, windows)
    assert abs(smollm_result.perplexity / peer - 1) < 0.01, (smollm_result.perplexity, peer)


def test_converted_folder_evaluates_the_same(smollm, text, smollm_result, tmp_path):
    save_hf(smollm, tmp_path / "hf")
    again = tightfit.load(tmp_path / "hf")
    r = run(again, text, base=smollm)
    assert r.perplexity == pytest.approx(smollm_result.perplexity, rel=1e-6)
    assert r.kld_max < 1e-6 and r.top1_agreement == 1.0


def test_f16_gguf_in_llama_cpp_matches_the_original(smollm, text, smollm_result, tmp_path):
    require_llama_cpp()
    from tightfit.eval import llama_cpp

    path = write_gguf_f16(smollm, tmp_path / "f16.gguf")
    windows = make_windows(tokenize(smollm.tokenizer, text), 512, CHUNKS)
    original, f16 = llama_cpp.perplexity(smollm.path, windows), llama_cpp.perplexity(path, windows)
    assert abs(f16 / original - 1) < 0.01, (f16, original)
    back = tightfit.load(path)  # and tightfit reads its own F16 file back to (nearly) the same model
    r = run(back, text, base=smollm)
    assert r.kld_mean < 1e-3 and r.top1_agreement > 0.99
    assert abs(r.perplexity / smollm_result.perplexity - 1) < 0.005


def test_exported_artifact_agrees_in_llama_cpp(smollm, text, tmp_path):
    require_llama_cpp()
    from tightfit.eval import llama_cpp
    from tightfit.eval.perplexity import window_logprobs
    from tightfit.export.gguf_quant import export_gguf
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    quantize("smollm2-135m", QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True)), tmp_path / "a")  # -> Q4_0
    report = export_gguf(tmp_path / "a", tmp_path / "a.gguf")
    assert report["exact"]
    from tightfit.runtime import load_runtime

    art = load_runtime(tmp_path / "a")  # what tightfit runs: the same codes, int8 activations as llama.cpp
    windows = make_windows(tokenize(art.tokenizer, text), 512, CHUNKS)
    llm = llama_cpp.open_llama(tmp_path / "a.gguf", 512)
    try:
        # the chat template and BOS/EOS handling travel with the file
        assert llm.metadata.get("tokenizer.chat_template") == art.tokenizer.chat_template
        assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == art.tokenizer.eos_token_id
        chat = art.tokenizer.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}],
                                                 add_generation_prompt=True, tokenize=False)
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == \
            art.tokenizer(chat, add_special_tokens=False)["input_ids"]
        ref = tightfit.load(tmp_path / "a").model.float()  # the same codes evaluated exactly in fp32
        same = ref_same = total = 0
        nll = []
        for i in range(CHUNKS):
            theirs = llama_cpp.window_logprobs(llm, windows, i)
            ours = window_logprobs(art.model, windows.tokens[i], windows.first)
            same += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            ref_same += int((theirs.argmax(-1) == window_logprobs(ref, windows.tokens[i], windows.first).argmax(-1))
                            .sum())
            total += theirs.shape[0]
            nll.append(-theirs.gather(-1, windows.targets(i)[:, None])[:, 0])
    finally:
        llm.close()
    peer_ppl = float(torch.cat(nll).mean().exp())
    # bench/engine_agreement.py (8 windows): llama.cpp agrees with itself across micro-batch sizes on 100% of
    # positions, but with an exact fp32 evaluation of the same codes on only 95.9% (Q4_0) / 96.7% (Q4_1) /
    # 96.2% (Q8_0): its 8-bit activation rounding flips near-ties on this model, so no other engine reaches the
    # issue's 98%. Our runtime: 94.9% / 96.1% / 95.9%; on another machine of this kind (2026-12-02, the code of
    # 6c3ad8b as well) 93.3% against 95.9%. Held here: within 3 points of the fp32 evaluation.
    assert same / total >= ref_same / total - 0.03, (same / total, ref_same / total)
    assert same / total >= 0.93, same / total
    assert abs(run(art, text).perplexity / peer_ppl - 1) < 0.01


PROMPTS = ["The President of the United States", "def fibonacci(n):", "Once upon a time", "The capital of France is",
           "In 2016, the economy", "Water boils at"]


@pytest.fixture(scope="module")
def reference_greedy(smollm):
    """32 greedy tokens per prompt from the fp32 transformers model, with the top-2 logit gap at each step."""
    out = {}
    for prompt in PROMPTS:
        cur, toks, gaps = smollm.tokenizer(prompt)["input_ids"], [], []
        with torch.inference_mode():
            for _ in range(32):
                top = smollm.model(torch.tensor([cur])).logits[0, -1].topk(2)
                toks.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                cur = cur + toks[-1:]
        out[prompt] = (toks, gaps)
    return out


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


@pytest.mark.real
def test_runtime_greedy_matches_the_reference_up_to_ties(reference_greedy):
    """bf16 runtime (torch's int4 op) against the fp32 reference's 32 greedy tokens, two ways. Free-running: the
    first difference falls where the reference itself has a near-tie, a top-2 margin within 0.25 (bf16
    activations move logits by that much after 30 layers on some CPUs: a Xeon with AMX differed at token 17 of
    32 where the margin was 0.205). Teacher-forced, fed the reference's own tokens through the decode path:
    the runtime's argmax equals the reference's at every step that is not a near-tie. (A count of prompts
    identical end to end was tried and is machine-dependent: 5 of 6 on EPYC, 3 on one Xeon, 2 on CI's.)"""
    from tightfit.runtime import generate, load_runtime

    rt = load_runtime("smollm2-135m", kernel="torch")
    forced = ties = 0
    for prompt, (want, gaps) in reference_greedy.items():
        ids = rt.tokenizer(prompt)["input_ids"]
        got = [s.token for s in generate(rt.model, rt.tokenizer, ids, 32, ignore_eos=True)]
        i = _first_difference(got, want)
        assert i == 32 or gaps[i] < 0.25, f"{prompt!r}: differs at token {i} where the reference's margin is {gaps[i]:.3f}"
        cache = rt.model.new_cache(1, len(ids) + 32)
        logits = rt.model.forward(torch.tensor([ids]), 0, cache)[0, -1]
        for k, (tok, gap) in enumerate(zip(want, gaps)):
            top = int(logits.argmax())
            ties += gap < 0.25
            forced += gap >= 0.25
            assert top == tok or gap < 0.25, f"{prompt!r}, forced step {k}: argmax {top}, reference {tok} (margin {gap:.3f})"
            logits = rt.model.forward(torch.tensor([[tok]]), len(ids) + k, cache)[0, -1]
    assert forced >= 0.8 * 32 * len(PROMPTS), (forced, ties)  # the check is not vacuous: most steps are no tie


@pytest.mark.real
def test_fast_kernel_stays_close_to_the_reference(smollm, text):
    """tightfit's VNNI kernel quantizes activations to int8 per 32 (as llama.cpp does): not greedy-identical to
    fp32, so it is held to a distribution bound on real text instead. Top-1 agreement gets a wider margin than KLD:
    with int8 activations the result is chaotic in the last bit (this model's residual stream reaches ~760, so a
    1e-7 change flips codes in later layers): two summation orders of the same kernel, equal to 1e-7 per product,
    scored 0.969 and 0.947 on these windows at the same KLD (0.0023)."""
    from tightfit.runtime import load_runtime
    from tightfit.runtime.kernels import library

    if library() is None:
        pytest.skip("tightfit's kernel needs AVX-512 VNNI and a C++ compiler")
    rt = load_runtime("smollm2-135m")
    assert rt.model.layers[0].qkv.kind == "q4"
    r = run(rt, text, base=smollm)
    assert r.kld_mean < 0.01 and r.top1_agreement > 0.93, (r.kld_mean, r.top1_agreement)


@pytest.mark.parametrize("fmt", ["asym3-g32", "sym3-g32", "asym2-g64"])
def test_algorithms_beat_rtn_on_real_layers(smollm, fmt):
    """GPTQ and AWQ's clip search (with real activations) and HQQ (without) against RTN, on real weights of the
    default model after the off-grid rescale (its own weights sit on a 4-bit grid, which flatters RTN)."""
    from tightfit.data import CALIBRATION
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.awq import awq_clip
    from tightfit.quant.core import rtn
    from tightfit.quant.equivalence import offgrid
    from tightfit.quant.gptq import gptq
    from tightfit.quant.hqq import hqq

    lm = copy.deepcopy(smollm)
    with torch.no_grad():
        offgrid(lm.model.state_dict(), lm.config, sigma=0.1, seed=0)
    layer = lm.model.model.layers[7]
    mods = {"q_proj": layer.self_attn.q_proj, "down_proj": layer.mlp.down_proj}
    grams = {}

    def keep(name):
        def hook(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x / x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in mods.items()]
    try:
        # 16 x 256 tokens: more than down_proj's 1536 inputs (fewer leave H singular and GPTQ fits them alone)
        ids = calibration_ids(lm.tokenizer, read_part(CALIBRATION), 16, 256, 1)
        with torch.no_grad():
            for row in ids:
                lm.model(row[None])
    finally:
        for h in handles:
            h.remove()
    f = WeightFormat.parse(fmt)
    for name, mod in mods.items():
        w, H = mod.weight.detach().float(), (grams[name] / 16).float()
        base = rtn(w, f, H).error
        # measured (layer 7): GPTQ 0.15-0.36x RTN's output error, AWQ's clip 0.46-0.80x, HQQ 0.87-0.92x on weight
        # MSE; HQQ's output error 0.85-0.92x with a zero point, but 1.40x on the symmetric q_proj; GPTQ from
        # searched group ranges 0.94-0.96x GPTQ from min/max at 3 bits, 0.62-0.64x at 2 bits
        g = gptq(w, H, f).error["output_rel_err"]
        assert g < 0.45 * base["output_rel_err"], name
        assert g < 0.98 * gptq(w, H, f, clip_search=False).error["output_rel_err"], name
        assert awq_clip(w, f, H).error["output_rel_err"] < 0.85 * base["output_rel_err"], name
        h = hqq(w, f, H).error
        assert h["weight_rel_mse"] < 0.95 * base["weight_rel_mse"], name
        if not f.symmetric:
            assert h["output_rel_err"] < 0.95 * base["output_rel_err"], name
