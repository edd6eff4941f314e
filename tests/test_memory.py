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
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"vmhwm_kb": int(hwm.split()[1])}))
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("big")
    tok = make_tokenizer(add_bos=False)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters()) * 4


def peak_kb(*args) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["vmhwm_kb"]


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
