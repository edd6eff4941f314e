"""Layer-by-layer quantization holds about one layer at a time: the peak RSS (VmHWM) of a subprocess that
quantizes a model stays far below the model's size."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from .conftest import make_tokenizer

SCRIPT = textwrap.dedent("""
    import json, sys
    from tightfit.models import load_lazy
    lazy = load_lazy(sys.argv[1])
    if sys.argv[2] == "quantize":
        from tightfit.formats import WeightFormat
        from tightfit.quant.api import quantize
        from tightfit.quant.config import QuantConfig
        quantize(sys.argv[1], QuantConfig(method=sys.argv[3], fmt=WeightFormat(4, 32, False), calib_samples=4,
                                          calib_ctx=64), sys.argv[4])
    if sys.argv[2] == "sensitivities":
        from tightfit.data import CALIBRATION, read_part
        from tightfit.quant.api import calibration_ids
        from tightfit.quant.config import QuantConfig
        from tightfit.quant.mixed import CANDIDATES, priced_sensitivities
        ids = calibration_ids(lazy.tokenizer, read_part(CALIBRATION), 4, 64)
        sens, _, _ = priced_sensitivities(lazy, ids, QuantConfig(method=sys.argv[3]),
                                          [f for f in CANDIDATES if f.bits == 4])
        assert sens.loss.shape[0] == 2 + 7 * lazy.config.num_hidden_layers
    if sys.argv[2] == "eval-base":
        from tightfit.data import EVALUATION, read_part
        from tightfit.eval import evaluate
        from tightfit.eval.reference import load_reference
        base = load_reference(sys.argv[1])
        r = evaluate(base, read_part(EVALUATION)[:20000], text_name="t", text_sha256="x", ctx=128, chunks=8,
                     base=load_reference(sys.argv[1]))
        assert r.kld_max < 1e-6
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"vmhwm_kb": int(hwm.split()[1])}))
""")


def random_checkpoint(folder, config, tok, dtype=torch.float32) -> int:
    """A random-weight model of `config` saved to folder with tokenizer `tok`; -> its fp32 bytes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


def random_model(tmp_path_factory, name: str, config_class, dtype=torch.float32, **shape):
    """(folder, fp32 bytes) of a random checkpoint with this config shape and a tiny tokenizer."""
    folder = tmp_path_factory.mktemp(name)
    tok = make_tokenizer(add_bos=False)
    return folder, random_checkpoint(folder, config_class(vocab_size=len(tok), **shape), tok, dtype)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from transformers import LlamaConfig

    return random_model(tmp_path_factory, "big", LlamaConfig, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


def peak_kb(*args) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["vmhwm_kb"]


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """48 layers of hidden 768 (1.2 GB in fp32, stored in bf16, untied head): one layer is 1/48 of it."""
    from transformers import Qwen2Config

    return random_model(tmp_path_factory, "deep", Qwen2Config, torch.bfloat16, hidden_size=768,
                        intermediate_size=2048, num_hidden_layers=48, num_attention_heads=6, num_key_value_heads=2,
                        tie_word_embeddings=False)


@pytest.mark.parametrize("verb", ["sensitivities", "eval-base"])
def test_sensitivities_and_eval_base_hold_a_quarter_of_the_fp32_model(deep_model, verb):
    """Both used to hold the whole model in fp32 (the Fisher's full backward; the base of a KLD); layer by
    layer, they hold one layer's weights, gradients and Fisher plus the windows' activations."""
    folder, model_bytes = deep_model
    assert model_bytes > 1e9
    baseline = peak_kb(folder, "load")
    extra = (peak_kb(folder, verb, "awq") - baseline) * 1024
    assert extra < 0.25 * model_bytes, f"{verb} took {extra / 1e6:.0f} MB over the baseline for a {model_bytes / 1e6:.0f} MB model"


@pytest.mark.parametrize("method", ["rtn"])  # GPTQ adds its Hessians (in^2 x 4 bytes), and minutes
def test_quantizing_holds_about_one_layer(big_model, tmp_path, method):
    folder, model_bytes = big_model
    assert model_bytes > 700e6
    baseline = peak_kb(folder, "load")
    peak = peak_kb(folder, "quantize", method, tmp_path / "out")
    extra = (peak - baseline) * 1024
    # one fp32 layer and its working copies (~0.25 of this model) plus the packed 4-bit output (~0.14)
    assert extra < 0.45 * model_bytes, f"quantizing took {extra / 1e6:.0f} MB over the baseline for a {model_bytes / 1e6:.0f} MB model"
    assert (tmp_path / "out" / "manifest.json").exists()


RUNTIME_PEAK = r"""
import sys, torch
from tightfit.runtime import load_runtime, generate
import tightfit.runtime.load, transformers  # imports and torch's kernels warmed before the baseline
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 32, dtype=torch.int32), 8)
before = hwm()
lm = load_runtime(sys.argv[1], max_memory=int(sys.argv[2]) or None)
toks = [s.token for s in generate(lm.model, lm.tokenizer, [5, 6, 7], 6, ignore_eos=True)]
print(hwm() - before, lm.model.weight_bytes()["per_token"], *toks)
"""


def test_runtime_budget_bounds_peak_rss_for_a_model_several_times_larger(big_model):
    """--max-memory: the weights (bf16, ~366 MB) are 6x the budget; the process's peak RSS (VmHWM) grows by the
    runtime's fixed overhead (measured by the same run without a budget, less its weights) plus the budget."""
    folder, _ = big_model
    budget = 60_000_000

    def run(b):
        out = subprocess.run([sys.executable, "-c", RUNTIME_PEAK, str(folder), str(b)], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1]), out[2:]

    grown, weights, toks = run(budget)
    grown_full, weights_full, toks_full = run(0)
    assert weights == pytest.approx(weights_full, rel=0.01) and weights > 6 * budget
    overhead = grown_full - weights_full
    assert grown < overhead + budget + 40_000_000, f"grew {grown / 1e6:.0f} MB; overhead {overhead / 1e6:.0f} MB"
    assert toks == toks_full  # streamed weights compute the same tokens


def test_streamed_safetensors_reads_back_exactly(tmp_path):
    """write_safetensors (no bytes copy of the whole dict, unlike save_file) writes what safetensors reads back:
    every dtype the artifacts use, a non-contiguous tensor, an empty one, a scalar, and the metadata."""
    from safetensors import safe_open

    from tightfit.io import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w.qweight": torch.randint(0, 255, (7, 12), dtype=torch.uint8, generator=g),
               "w.scales": torch.randn(7, 3, generator=g).bfloat16(), "h": torch.randn(5, 4, generator=g).half(),
               "f": torch.randn(3, 6, generator=g).t(), "g_idx": torch.arange(12, dtype=torch.int32),
               "i64": torch.arange(3), "empty": torch.zeros(0, 4), "s": torch.tensor(2.5), "b": torch.tensor([True, False]),
               "i8": torch.tensor([-3, 4], dtype=torch.int8)}
    write_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "tightfit", "n": 3})
    header_len = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0  # the data starts aligned, as save_file writes it
    with safe_open(tmp_path / "a.safetensors", framework="pt") as h:
        assert h.metadata() == {"format": "tightfit", "n": "3"}
        assert set(h.keys()) == set(tensors)
        for k, t in tensors.items():
            got = h.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    with pytest.raises(TypeError, match="complex64"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_import_turns_on_torchs_huge_pages_unless_the_user_chose():
    """torch reads THP_MEM_ALLOC_ENABLE once, when it loads: `import tightfit` sets it first (half of a quantize's
    time was page faults of 4 KiB pages), and leaves a user's own setting alone."""
    import os

    code = "import os, tightfit, torch; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = (lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                    check=True).stdout.strip())
    assert run(env) == "1"
    assert run(env | {"THP_MEM_ALLOC_ENABLE": "0"}) == "0"
