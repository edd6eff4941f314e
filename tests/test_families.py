"""Every family in tightfit/models/families through every verb, on tiny random configs built with transformers:
the layered reference forward against transformers' own, the runtime against the reference, quantize -> artifact
-> runtime, GGUF export read back by llama.cpp, the planner's parameter count. A new family adds its config here."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tightfit
from tightfit.errors import UnsupportedArchitectureError
from tightfit.formats import WeightFormat
from tightfit.quant.api import quantize
from tightfit.quant.config import QuantConfig

from .conftest import make_tokenizer, require_llama_cpp

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3,
              tie_word_embeddings=True)


def family_config(name: str, vocab: int):
    import transformers as tf

    c = dict(COMMON, vocab_size=vocab)
    if name == "llama":  # Llama 3.1's rope scaling
        return tf.LlamaConfig(**c, head_dim=16, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if name == "mistral":  # a sliding window shorter than the test windows
        return tf.MistralConfig(**c, head_dim=16, sliding_window=24)
    if name == "qwen2":
        return tf.Qwen2Config(**c)
    if name == "qwen3":  # head_dim larger than hidden / heads, as in Qwen3
        return tf.Qwen3Config(**c, head_dim=32)
    if name == "gemma3":  # 6 layers: 5 sliding (window 24), the 6th full, as llama.cpp lays Gemma 3 out
        return tf.Gemma3TextConfig(**dict(c, num_hidden_layers=6), head_dim=16, sliding_window=24,
                                   query_pre_attn_scalar=16)
    if name == "phi3":
        return tf.Phi3Config(**c)
    if name == "phi3-partial":  # Phi-4-mini's partial rotary embedding
        return tf.Phi3Config(**c, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5})
    moe = dict(c, intermediate_size=128)
    if name == "mixtral":  # 4 experts, top-2
        return tf.MixtralConfig(**moe, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen3_moe":  # top-2 of 4 with renormalized gates, q/k norms
        return tf.Qwen3MoeConfig(**moe, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                 norm_topk_prob=True)
    if name.startswith("qwen2_moe"):  # gates not renormalized, a shared expert; -dense0: layer 0 a dense MLP
        return tf.Qwen2MoeConfig(**moe, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=64, norm_topk_prob=False,
                                 mlp_only_layers=[0] if name.endswith("dense0") else [])
    if name == "olmoe":  # q/k norms over all heads, gates not renormalized; no GQA, as OLMoE (and llama.cpp's olmoe)
        return tf.OlmoeConfig(**dict(moe, num_key_value_heads=4), num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=False)
    raise KeyError(name)


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi3-partial"]
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "qwen2_moe-dense0", "olmoe"]
FAMILIES = DENSE + MOE


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    tokenizer = make_tokenizer(add_bos=True)
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(name, len(tokenizer)))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim >= 2:  # linears, and transformers' 3-D expert parameters
                    p.normal_(0, 0.15)
                elif n.endswith("norm.weight"):  # norms away from their init, so an offset or a missed norm shows
                    p.normal_(0 if "gemma" in name else 1, 0.2)
                else:
                    p.normal_(0, 0.1)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def kld(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def close(want: torch.Tensor, got: torch.Tensor, name: str, bound: float = 2e-3) -> None:
    """Mean KLD over positions < bound. MoE: a router near a tie between two experts can route differently under
    bf16 or int8-activation noise (as in any engine), and the other expert's output then reaches every later
    position through attention: the whole model within a mean KLD of 0.05, the block itself exactly
    (test_moe_block_routes_as_transformers)."""
    assert kld(want, got) < (bound if name not in MOE else 0.05)


def ids_for(tok, text: str, n: int = 48) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"][:n]])


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_forward_equals_transformers(family_models, short_eval_text, name):
    """The layered forward (calibration, eval --base, sensitivities) is transformers' own function."""
    from tightfit.eval.reference import load_reference

    lm = tightfit.load(family_models[name])
    ids = ids_for(lm.tokenizer, short_eval_text)  # 48 tokens: past the 24-token sliding windows
    with torch.inference_mode():
        want = lm.model(ids).logits[0]
    ref = load_reference(str(family_models[name]))
    ref.prepare(ids, 0)
    got = ref.logprobs(0)
    assert float((torch.log_softmax(want[:-1], -1) - got).abs().max()) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_runtime_matches_the_reference(family_models, short_eval_text, name):
    """bf16 runtime vs fp32 transformers: KLD < 2e-3 over 48 positions; incremental decoding (the fused C step
    where the weights allow it) gives what one pass gives; greedy continuations agree for 32 tokens wherever
    the reference's top two are not within bf16 noise of each other."""
    from tightfit.runtime import load_runtime

    lm = tightfit.load(family_models[name])
    rt = load_runtime(family_models[name])
    ids = ids_for(lm.tokenizer, short_eval_text)
    with torch.inference_mode():
        want = lm.model(ids).logits[0]
    got = rt.model(ids).logits[0]
    close(want, got, name)
    cache = rt.model.new_cache(1, 128)
    first = rt.model.forward(ids[:, :20], 0, cache, 20)[0]
    steps = [rt.model.forward(ids[:, i:i + 1], i, cache)[0] for i in range(20, ids.shape[1])]
    close(got, torch.cat([first] + steps), name, 1e-3)
    # greedy: the runtime's own continuation, checked token by token against the reference
    seq, misses = ids[0, :8].tolist(), 0
    cache = rt.model.new_cache(1, 128)
    logits = rt.model.forward(torch.tensor([seq]), 0, cache)[0, -1]
    for _ in range(32):
        nxt = int(logits.argmax())
        with torch.inference_mode():
            ref = lm.model(torch.tensor([seq])).logits[0, -1]
        top2 = ref.topk(2).values
        misses += not (nxt == int(ref.argmax()) or float(top2[0] - top2[1]) < 0.05)
        seq.append(nxt)
        logits = rt.model.forward(torch.tensor([[nxt]]), len(seq) - 1, cache)[0, -1]
    assert misses <= (2 if name in MOE else 0), (name, misses)  # MoE: a near-tie routing flip (see close)


@pytest.mark.parametrize("name", MOE)
def test_moe_block_routes_as_transformers(family_models, name):
    """The runtime's MoE block (fp32 router, top-k, gate normalization, shared expert) on the same inputs as
    transformers' block: the same experts chosen, outputs within bf16 weight rounding (1%)."""
    from tightfit.runtime import load_runtime

    lm = tightfit.load(family_models[name])
    rt = load_runtime(family_models[name])
    i = next(i for i, L in enumerate(rt.model.layers) if L.moe is not None)
    x = torch.randn(64, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = lm.model.model.layers[i].mlp(x[None])[0]
        got = rt.model._moe(rt.model.layers[i].moe, x)
    assert float((want - got).norm() / want.norm()) < 0.01
    if name == "qwen2_moe-dense0":  # layer 0 is dense (mlp_only_layers)
        assert rt.model.layers[0].moe is None and rt.model.layers[0].gate_up is not None


def quant_config(method: str) -> QuantConfig:
    return QuantConfig(method=method, fmt=WeightFormat(4, 32, method != "gptq"), calib_samples=8, calib_ctx=48,
                       calib_generated=0.0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq-gptq"])
def test_quantize_round_trip_runs_on_the_runtime(family_models, tmp_path, short_eval_text, name, method):
    """quantize -> artifact on disk -> the runtime runs it as its dequantized weights (fused C decode step)."""
    from tightfit.runtime import load_runtime

    quantize(family_models[name], quant_config(method), tmp_path / "a")
    out = tmp_path / "a"
    ref = tightfit.load(out)  # dequantized, through transformers
    rt = load_runtime(out)
    ids = ids_for(ref.tokenizer, short_eval_text)
    with torch.inference_mode():
        want = ref.model(ids).logits[0]
    close(want, rt.model(ids).logits[0], name, 3e-3)
    if name in MOE:  # the manifest says how experts were fitted
        experts = json.loads((out / "manifest.json").read_text())["experts"]
        assert experts["fallbacks"] == {} and "every token" in experts["fallback"]
    if name == "olmoe":  # full-width q/k norms: the torch step
        assert rt.model.fused() is None
        return
    assert rt.model.fused() is not None  # every linear on tightfit's kernel: the one-call decode step runs it
    cache = rt.model.new_cache(1, 64)
    rt.model.forward(ids[:, :40], 0, cache)
    fused = rt.model.forward(ids[:, 40:41], 40, cache)[0, -1]
    assert kld(want[40][None], fused[None]) < (3e-3 if name not in MOE else 0.05)
    base = tightfit.load(family_models[name])
    with torch.inference_mode():
        assert kld(base.model(ids).logits[0], want) < 0.5  # a 4-bit copy of the model, not another function


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "olmoe"])
def test_the_batched_c_decode_step_matches_each_sequence_alone(family_models, tmp_path, name):
    """The server's batched step in one C call per layer (decode_rows: windows, q/k norms, sandwich norms,
    partial rotary, each row's own experts) against the one-sequence C step, rows at different positions."""
    from tightfit.runtime import load_runtime

    quantize(family_models[name], quant_config("rtn"), tmp_path / "a")
    e = load_runtime(tmp_path / "a").model
    assert e.fused() is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 30, 90)]
    caches = [e.new_cache(1, 128) for _ in prompts]
    for c, p in zip(caches, prompts):
        e.forward(torch.tensor([p]), 0, c)
    calls = []
    real = e._fused_rows
    e._fused_rows = lambda *a: (calls.append(1), real(*a))
    rows = e.decode_rows([11, 12, 13], [len(p) for p in prompts], caches)
    assert calls  # the C step ran, not the per-op torch loop
    for b, p in enumerate(prompts):
        c = e.new_cache(1, 128)
        e.forward(torch.tensor([p]), 0, c)
        alone = e.forward(torch.tensor([[11 + b]]), len(p), c)[0, -1]
        assert kld(alone[None], rows[b][None]) < 1e-4, (name, b)
    # the caches hold what one sequence alone would have written: the next step agrees too
    again = e.decode_rows([5, 6, 7], [len(p) + 1 for p in prompts], caches)
    c = e.new_cache(1, 128)
    e.forward(torch.tensor([prompts[1]]), 0, c)
    e.forward(torch.tensor([[12]]), len(prompts[1]), c)
    assert kld(e.forward(torch.tensor([[6]]), len(prompts[1]) + 1, c)[0, -1][None], again[1][None]) < 1e-4


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_mixed_precision_plan_quantizes_each_family(family_models, tmp_path, name):
    cfg = QuantConfig(method="rtn", fmt=WeightFormat(4, 32, False), calib_generated=0.0, calib_samples=4,
                      calib_ctx=32, tensor_formats={f"model.layers.0.{n}.weight": WeightFormat.parse("sym8-g32")
                                                    for n in tightfit.models.families.family_of(
                                                        json.loads((family_models[name] / "config.json").read_text())
                                                        ["model_type"]).qkv})
    quantize(family_models[name], cfg, tmp_path / "m")
    out = tmp_path / "m"
    tensors = json.loads((out / "manifest.json").read_text())["tensors"]
    fam = tightfit.models.families.family_of(json.loads((out / "config.json").read_text())["model_type"])
    assert all(tensors[f"model.layers.0.{n}.weight"]["format"] == "sym8-g32" for n in fam.qkv)
    assert tensors[f"model.layers.1.{fam.qkv[0]}.weight"]["format"] == "asym4-g32"


GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf_export_runs_in_llama_cpp(family_models, tmp_path, short_eval_text, caplog, name):
    """The sym4 artifact exported as Q4_0 (MoE: each projection's experts stacked): llama.cpp's logits on it agree
    with tightfit's evaluation of the same codes (llama.cpp rounds activations to 8 bits for its Q4_0 dot
    products: KLD < 0.01). llama.cpp's llama architecture has no sliding window: Mistral's export says so and is
    compared within its window."""
    import numpy as np

    from tightfit.eval.llama_cpp import open_llama
    from tightfit.export.gguf_quant import export_gguf

    require_llama_cpp()
    quantize(family_models[name], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                    calib_generated=0.0), tmp_path / "a")
    out = tmp_path / "a"
    export_gguf(out, tmp_path / "a.gguf")
    warned = "without a sliding window: the exported file matches this model only up to 24 tokens" in caplog.text
    assert warned == (name == "mistral")
    ref = tightfit.load(out)
    ids = ids_for(ref.tokenizer, short_eval_text, 24 if name == "mistral" else 40)
    with torch.inference_mode():
        want = ref.model(ids).logits[0]
    llm = open_llama(tmp_path / "a.gguf", 64, threads=2)
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
    close(want, got, name, 0.01)  # MoE: routing near ties (see close)
    # tightfit reads its own GGUF back as the same function (MoE: the stacked experts split again), and its
    # runtime runs the file's Q4_0 codes as it runs the artifact's
    if name == "olmoe":  # transformers' GGUF reader has no olmoe config or tokenizer: refused by name
        with pytest.raises(tightfit.errors.GGUFFormatError, match="of the 'olmoe' architecture, whose config and"):
            tightfit.load(tmp_path / "a.gguf")
        return
    back = tightfit.load(tmp_path / "a.gguf")
    with torch.inference_mode():
        assert kld(want, back.model(ids).logits[0]) < 1e-4
    from tightfit.runtime import load_runtime

    assert kld(load_runtime(out).model(ids).logits[0], load_runtime(tmp_path / "a.gguf").model(ids).logits[0]) < 1e-6


def test_gguf_export_names_what_llama_cpp_cannot_take(family_models, tmp_path):
    from tightfit.export.gguf_quant import export_gguf

    quantize(family_models["qwen2_moe-dense0"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                            calib_generated=0.0), tmp_path / "moe")
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(
            "layers [0] have a dense MLP (mlp_only_layers / decoder_sparse_step); llama.cpp's qwen2moe")):
        export_gguf(tmp_path / "moe", tmp_path / "moe.out")
    assert not (tmp_path / "moe.out").exists()

    quantize(family_models["phi3-partial"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                              calib_generated=0.0), tmp_path / "a")
    out = tmp_path / "a"
    with pytest.raises(UnsupportedArchitectureError, match="partial rotary embeddings"):
        export_gguf(out, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_planner_counts_the_models_parameters(family_models, name):
    from tightfit.planner.spec import load_spec

    lm = tightfit.load(family_models[name])
    total = sum(p.numel() for p in lm.model.parameters())  # tied: the shared table once
    spec = load_spec(str(family_models[name]))
    assert spec.params == total
    if name in MOE:
        return
    names = {i.name for i in spec.items}
    params = {n for n, _ in lm.model.named_parameters() if n.endswith(".weight") and "norm" not in n}
    assert names == params  # the plan's items are the tensors quantize will look up


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe-dense0", "olmoe"])
def test_compressed_tensors_export(family_models, tmp_path, name):
    """Read back by transformers' compressed-tensors loader as the artifact's function; MoE experts one packed
    tensor each in their checkpoint names (Mixtral's block_sparse_moe.experts.E.w1), routers left dense."""
    from transformers import AutoModelForCausalLM

    from tightfit.export.compressed_tensors import export_compressed_tensors

    quantize(family_models[name], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                    calib_generated=0.0), tmp_path / "a")
    out = tmp_path / "a"
    export_compressed_tensors(out, tmp_path / "ct")
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # fp32 compute: a near-tie
    # router under fp16 arithmetic can pick another expert
    ref = tightfit.load(out)
    ids = torch.arange(5, 45)[None]
    with torch.inference_mode():
        assert kld(ref.model(ids).logits[0], ct(ids).logits[0]) < 1e-4


def test_unknown_architecture_lists_the_families_and_the_closest(tmp_path, family_models):
    """A model type transformers knows but tightfit has no module for (Qwen3-Next): every verb refuses it."""
    import shutil

    from tightfit.runtime import load_runtime

    bad = tmp_path / "bad"
    shutil.copytree(family_models["qwen3"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen3_next"}))
    msg = re.escape("holds a 'qwen3_next' model; tightfit handles model types ['llama', 'mistral', 'qwen2', 'qwen3', "
                    "'gemma3_text', 'phi3', 'mixtral', 'qwen3_moe', 'qwen2_moe', 'olmoe']. The closest supported "
                    "type is 'qwen3_moe'")
    for verb in (tightfit.load, tightfit.models.load_lazy, load_runtime):
        with pytest.raises(UnsupportedArchitectureError, match=msg):
            verb(bad)


def test_checkpoint_that_does_not_match_its_config_names_the_tensor(family_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tightfit.errors import NotAModelError

    bad = tmp_path / "bad"
    shutil.copytree(family_models["qwen3"], bad)
    f = bad / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.self_attn.k_norm.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:100]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(NotAModelError, match=re.escape("model.layers.0.mlp.up_proj.weight has shape (100, 64) but "
                                                       "the config implies (128, 64)")):
        tightfit.models.load_lazy(bad)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(NotAModelError, match=re.escape("lacks weights ['model.layers.1.self_attn.k_norm.weight']")):
        tightfit.models.load_lazy(bad)


@pytest.mark.parametrize("name", ["mistral", "gemma3", "qwen3", "phi3-partial"])
def test_batched_decode_rows_match_each_sequence_alone(family_models, name):
    """The server's batched step (C attention over each row's cache, its window applied) against one sequence
    at a time, at positions past the sliding window."""
    from tightfit.runtime import load_runtime

    e = load_runtime(family_models[name]).model
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 30, 90)]
    caches = [e.new_cache(1, 128) for _ in prompts]
    for c, p in zip(caches, prompts):
        e.forward(torch.tensor([p]), 0, c)
    rows = e.decode_rows([11, 12, 13], [len(p) for p in prompts], caches)
    for b, p in enumerate(prompts):
        c = e.new_cache(1, 128)
        e.forward(torch.tensor([p]), 0, c)
        alone = e.forward(torch.tensor([[11 + b]]), len(p), c)[0, -1]
        assert kld(alone[None], rows[b][None]) < 1e-4


def test_serve_answers_chat_for_a_sandwich_norm_family(family_models):
    """`tightfit serve` on Gemma 3: a chat completion over HTTP through the OpenAI client."""
    import openai

    from tightfit.runtime import load_runtime
    from tightfit.server.app import create_app

    from .test_server import serving

    lm = load_runtime(family_models["gemma3"])
    app = create_app(lm.model, lm.tokenizer, "gemma", api_key="k", ctx=256, max_tokens_limit=32)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=12, temperature=0)
        assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("length", "stop")


def test_experts_that_see_too_few_tokens_fall_back_and_say_so(family_models, tmp_path):
    """GPTQ on an expert needs about as many routed tokens as its input width; with 3 windows of 16 tokens no
    expert has 64, so each is fitted on every token entering its block, and the manifest lists them with their
    counts."""
    from tightfit.runtime import load_runtime

    cfg = QuantConfig(method="gptq", fmt=WeightFormat(4, 32, True), calib_samples=3, calib_ctx=16, calib_generated=0.0)
    quantize(family_models["qwen3_moe"], cfg, tmp_path / "a")
    fallbacks = json.loads((tmp_path / "a" / "manifest.json").read_text())["experts"]["fallbacks"]
    assert len(fallbacks) == 2 * 4 * 3  # every expert tensor of both MoE layers
    assert all(0 <= n < 64 for n in fallbacks.values())
    ref, rt = tightfit.load(tmp_path / "a"), load_runtime(tmp_path / "a")
    ids = torch.arange(5, 45)[None]
    with torch.inference_mode():
        close(ref.model(ids).logits[0], rt.model(ids).logits[0], "qwen3_moe")


def test_experts_stream_from_disk_under_a_weight_budget(family_models, tmp_path):
    """With --max-memory below the model, dense layers stay resident first and experts are the units read from
    disk, only when a token is routed to them: the same logits as fully resident, and per token about top_k /
    experts of the streamed experts' bytes."""
    from tightfit.runtime import load_runtime

    quantize(family_models["qwen2_moe-dense0"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                            calib_generated=0.0), tmp_path / "a")
    full = load_runtime(tmp_path / "a").model
    w = full.weight_bytes()
    # a resident tied embedding reads the head's rows (0 bytes of its own); the budget counts a table's worth
    total = w["layers"] + w["head"] + (w["embedding"] or w["head"])
    small = load_runtime(tmp_path / "a", max_memory=int(total * 0.7)).model
    s = small.streamer
    streamed = [k for k in s.streamed if isinstance(k, tuple) and k[0] == "expert"]
    assert streamed and not [k for k in s.streamed if isinstance(k, int)]  # experts go first, layers stay
    ids = torch.arange(5, 37)[None]
    assert torch.equal(full(ids).logits, small(ids).logits)
    cache = small.new_cache(1, 64)
    small.forward(ids, 0, cache)
    before = s.reads
    small.forward(torch.tensor([[7]]), 32, cache)
    per_expert = s.units[streamed[0]][1]
    assert 0 < s.reads - before <= 2 * per_expert  # top_k = 2 experts of its one MoE layer (layer 0 is dense)


def test_a_plan_gives_each_expert_its_groups_format(family_models, tmp_path):
    """The planner prices one projection of a layer's experts as one item; quantize gives every expert tensor
    of that group the plan's format."""
    from tightfit.planner.plan_io import formats_from_plan

    plan = {"model": "moe", "hardware": "this-machine", "devices": [], "context": 512, "batch": 1,
            "memory_bytes": 1, "kv_format": "bf16", "predicted": {"kld": 0.01}, "placement": {},
            "tensors": {"model.layers.1.mlp.experts.down_proj": "sym8-g32",
                        "model.layers.0.self_attn.q_proj.weight": "asym4-g32"}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = formats_from_plan(tmp_path / "plan.json", QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True),
                                                                calib_generated=0.0), "moe")
    quantize(family_models["mixtral"], cfg, tmp_path / "a")
    tensors = json.loads((tmp_path / "a" / "manifest.json").read_text())["tensors"]
    assert {tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]["format"] for e in range(4)} == {"sym8-g32"}
    assert {tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]["format"] for e in range(4)} == {"sym4-g32"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_precision_prices_each_expert_as_an_item(family_models, method):
    """The sensitivities of an MoE model: one item per expert tensor (priced on the tokens routed to it), the
    routers not items (they stay in full precision)."""
    from tightfit.data import CALIBRATION, read_part
    from tightfit.quant.api import calibration_ids
    from tightfit.quant.mixed import CANDIDATES, priced_sensitivities

    lazy = tightfit.models.load_lazy(family_models["qwen2_moe-dense0"])
    ids = calibration_ids(lazy.tokenizer, read_part(CALIBRATION), 4, 32)
    sens, ratios, _ = priced_sensitivities(lazy, ids, QuantConfig(method=method),
                                           [f for f in CANDIDATES if f.bits in (4, 8)])
    experts = [n for n in sens.names if ".mlp.experts." in n]
    assert len(experts) == 4 * 3  # layer 1's experts; layer 0 is dense
    assert not [n for n in sens.names if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert "model.layers.0.mlp.gate_proj.weight" in sens.names  # the dense layer's MLP
    assert "model.layers.1.mlp.shared_expert.down_proj.weight" in sens.names
    assert sens.loss.shape[0] == len(sens.names) == 1 + 7 + (4 + 3 + 12)
    assert (sens.loss[:, 0] > 0).all()  # every item priced at 4 bits
    if method == "gptq":
        assert all(n in ratios for n in experts)


def test_cost_model_prices_the_moe_step_per_layer_and_per_routed_expert(family_models):
    """MoE layers run on the runtime's torch step: the probe measures a cost per MoE layer and per routed expert
    (probe.fixed_costs), and the decode prediction adds them for each MoE layer instead of the fused layer's."""
    from dataclasses import replace

    from tightfit.hardware import get_device
    from tightfit.planner.cost import Workload, fixed_decode_seconds
    from tightfit.planner.spec import load_spec

    spec = load_spec(str(family_models["qwen2_moe-dense0"]))  # layer 0 dense, layer 1 top-2 of 4 experts
    base = get_device("ddr5-desktop")
    eff = {**base.efficiency, "overhead_s": 0.0, "overhead_layer_s": 1e-5}
    plain = fixed_decode_seconds(spec, replace(base, efficiency=eff), Workload(256))
    moe = fixed_decode_seconds(spec, replace(base, efficiency=eff | {"overhead_moe_layer_s": 2e-4,
                                                                     "overhead_expert_s": 5e-5}), Workload(256))
    assert moe - plain == pytest.approx(2e-4 + 2 * 5e-5 - 1e-5, rel=1e-6)
