"""Fuzzing the readers of outside data: every damaged GGUF file, artifact manifest, plan file and HTTP body ends in
a result or a typed TightfitError (or an OpenAI-style 4xx), never another exception. Hypothesis runs a fixed,
derandomized set of examples per target (seconds each; TIGHTFIT_FUZZ_EXAMPLES=N runs N random ones), plus the
cases fuzzing found, kept as tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tightfit.errors import TightfitError

FUZZ = settings(max_examples=int(os.environ.get("TIGHTFIT_FUZZ_EXAMPLES", 40)), deadline=None,
                derandomize=os.environ.get("TIGHTFIT_FUZZ_EXAMPLES") is None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small_gguf(tiny_models, tmp_path_factory) -> bytes:
    from tightfit.cli import main

    out = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    assert main(["convert", str(tiny_models["llama"]), "--to", "gguf-f16", "-o", str(out)]) == 0
    return out.read_bytes()


def read_gguf_fully(path: Path) -> None:
    """What every verb does first with a GGUF: open it, read config and tokenizer, dequantize tensors."""
    from tightfit.models.lazy import lazy_gguf

    lazy = lazy_gguf(path)
    for name in list(lazy.loaders):
        lazy.get(name)


def outcome(fn, *args) -> str:
    try:
        fn(*args)
        result = "ok"
    except TightfitError as e:
        result = f"typed error: {type(e).__name__}"
    if os.environ.get("TIGHTFIT_FUZZ_LOG"):  # outcome counts for the record: one line per example
        with open(os.environ["TIGHTFIT_FUZZ_LOG"], "a") as f:
            f.write(json.dumps({"target": getattr(fn, "__name__", str(fn)), "outcome": result}) + "\n")
    return result


@FUZZ
@given(data=st.data())
def test_damaged_gguf_files_give_a_result_or_a_typed_error(small_gguf, tmp_path, data):
    blob = bytearray(small_gguf)
    how = data.draw(st.sampled_from(["truncate", "bytes", "u64", "header-bytes"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how in ("bytes", "header-bytes"):
        end = min(len(blob), 4096) if how == "header-bytes" else len(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    else:  # a size, count, offset or type field claiming something huge or odd
        at = data.draw(st.integers(4, min(len(blob), 4096) - 8))
        value = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1]))
        blob[at:at + 8] = struct.pack("<Q", value)
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(blob))
    outcome(read_gguf_fully, path)


def test_a_tiny_file_claiming_a_huge_tensor_is_refused_before_allocating(small_gguf, tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(tmp_path / "huge.gguf", "llama")
    w.add_tensor_info("token_embd.weight", (1 << 20, 1 << 20), np.dtype(np.float32), 1 << 42)  # 4 TB claimed
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    path = tmp_path / "huge.gguf"
    assert path.stat().st_size < 4096
    import subprocess
    import sys

    code = ("import sys, resource\n"
            "from tightfit.models.gguf_file import open_gguf\n"
            "from tightfit.errors import TightfitError\n"
            "try:\n    open_gguf(sys.argv[1])\nexcept TightfitError as e:\n    print('refused:', e)\n"
            "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert "refused:" in r.stdout and "truncated" in r.stdout, r.stdout + r.stderr
    peak_kb = int(r.stdout.split("peak_kb")[1])
    assert peak_kb < 1_000_000  # the interpreter and its imports; nothing near the 4 TB claimed


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory) -> Path:
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("fuzz-art") / "art"
    quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, False)), out)
    return out


SCALAR = st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=True) | st.text(max_size=8)
JSON = SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(st.text(max_size=6), SCALAR, max_size=3)


def fresh_copy(src: Path, dst: Path) -> Path:
    """`src` copied to `dst` anew (hypothesis reruns a test in one tmp_path: the last example's damage goes)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def mutate_json(obj, data, depth=0):
    """obj with one value somewhere replaced by arbitrary JSON (or a key dropped)."""
    if isinstance(obj, dict) and obj and depth < 4 and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(obj)))
        if data.draw(st.integers(0, 5)) == 0:
            return {k: v for k, v in obj.items() if k != key}
        return obj | {key: mutate_json(obj[key], data, depth + 1)}
    if isinstance(obj, list) and obj and depth < 4 and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(obj) - 1))
        return obj[:i] + [mutate_json(obj[i], data, depth + 1)] + obj[i + 1:]
    return data.draw(JSON)


@pytest.fixture(scope="module")
def super_artifact(tmp_path_factory) -> Path:
    """An artifact in super-block formats (scale codes under fp16 super-scales), of a model with 256-wide rows."""
    from tightfit.formats import WeightFormat
    from tightfit.quant.api import quantize
    from tightfit.quant.config import QuantConfig

    from .test_superblock import build_wide

    root = tmp_path_factory.mktemp("fuzz-super")
    out = root / "art"
    quantize(build_wide(root / "model"), QuantConfig(method="rtn", fmt=WeightFormat.parse("asym4-k32"),
                                                     embed_fmt=WeightFormat.parse("sym6-k32")), out)
    return out


FORMAT_NAMES = ["asym4-g32", "sym4-g32", "asym4-k32", "sym6-k32", "asym2-k32", "sym8-pc", "asym3-g64", "asym5-k32"]


@FUZZ
@given(data=st.data())
def test_damaged_manifests_give_a_result_or_a_typed_error(artifact, super_artifact, tmp_path, data):
    import tightfit
    from tightfit.runtime import load_runtime

    artifact = data.draw(st.sampled_from([artifact, super_artifact]))
    bad = fresh_copy(artifact, tmp_path / "art")
    manifest = json.loads((artifact / "manifest.json").read_text())
    if data.draw(st.integers(0, 3)) == 0:  # a tensor said to be in another format (super-block ones among them)
        name = data.draw(st.sampled_from(sorted(manifest["tensors"])))
        manifest["tensors"][name]["format"] = data.draw(st.sampled_from(FORMAT_NAMES))
    text = json.dumps(mutate_json(manifest, data)) if data.draw(st.integers(0, 9)) else data.draw(st.text(max_size=40))
    (bad / "manifest.json").write_text(text)
    outcome(tightfit.load, bad)
    outcome(load_runtime, bad)


@FUZZ
@given(data=st.data())
def test_damaged_plans_give_a_result_or_a_typed_error(tiny_models, tmp_path, data):
    from tightfit.planner.plan_io import formats_from_plan
    from tightfit.quant.config import QuantConfig

    plan = {"model": str(tiny_models["llama"]), "hardware": "this", "devices": 1, "context": 512, "batch": 1,
            "memory_bytes": 1 << 20, "predicted": {"kld": 0.1}, "kv_format": "bf16", "placement": {},
            "tensors": {"model.layers.0.mlp.down_proj.weight": "asym4-g32"}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(mutate_json(plan, data)) if data.draw(st.integers(0, 9)) else data.draw(st.text()))
    outcome(formats_from_plan, path, QuantConfig(method="rtn"), str(tiny_models["llama"]))


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "stream", "logit_bias",
          "response_format", "tools", "tool_choice", "logprobs", "top_logprobs", "n", "seed", "presence_penalty"]
GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
GOOD_COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 3}


@pytest.fixture(scope="module")
def http(tiny_models):
    from fastapi.testclient import TestClient

    from tightfit.runtime import load_runtime
    from tightfit.server.app import create_app

    lm = load_runtime(tiny_models["llama"])
    with TestClient(create_app(lm.model, lm.tokenizer, "tiny", ctx=256, max_tokens_limit=8)) as c:
        yield c


@FUZZ
@given(data=st.data())
def test_fuzzed_request_bodies_get_an_answer_or_an_openai_4xx(http, data):
    path, good = data.draw(st.sampled_from([("/v1/chat/completions", GOOD_CHAT), ("/v1/completions", GOOD_COMPLETION)]))
    body = mutate_json(good | {data.draw(st.sampled_from(FIELDS)): data.draw(JSON)}, data)
    raw = json.dumps(body).encode() if data.draw(st.integers(0, 9)) else data.draw(st.binary(max_size=64))
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300], body)
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    if os.environ.get("TIGHTFIT_FUZZ_LOG"):
        with open(os.environ["TIGHTFIT_FUZZ_LOG"], "a") as f:
            f.write(json.dumps({"target": "http " + path, "outcome": str(r.status_code)}) + "\n")


def test_deeply_nested_and_oversized_bodies_are_refused(http):
    deep = "[" * 100_000 + "]" * 100_000
    r = http.post("/v1/chat/completions", content=deep.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    big = json.dumps(GOOD_COMPLETION | {"prompt": "x" * (20 << 20)}).encode()  # 20 MB, over the 16 MB limit
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than this server's limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: refused once the bytes so far pass the limit
        for _ in range(40):
            yield b"x" * (1 << 20)

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert http.post("/v1/completions", json=GOOD_COMPLETION).status_code == 200  # still serving


def test_found_by_fuzzing_a_vocabulary_that_its_merges_do_not_match(small_gguf, tmp_path):
    """transformers raised a bare Exception from its BPE builder; now a typed error that says what to do."""
    token = "\u0120the".encode()  # a merged token of the tiny tokenizer's vocabulary
    at = small_gguf.index(token)
    path = tmp_path / "m.gguf"
    path.write_bytes(small_gguf[:at] + "\u0120thq".encode() + small_gguf[at + len(token):])
    with pytest.raises(TightfitError, match="tokenizer in its metadata could not be read.*export it again"):
        read_gguf_fully(path)


def test_found_by_fuzzing_a_seed_past_64_bits_and_a_tiny_temperature(http):
    """seed 2^64 reached torch's manual_seed, whose ValueError escaped as a 500; temperature 6e-205 overflowed the
    scaled logits to inf and the sampler's probabilities to NaN (a 500)."""
    for path, good in (("/v1/chat/completions", GOOD_CHAT), ("/v1/completions", GOOD_COMPLETION)):
        r = http.post(path, json=good | {"seed": 2**64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert http.post("/v1/completions", json=GOOD_COMPLETION | {"seed": 2**64 - 1}).status_code == 200
    r = http.post("/v1/chat/completions", json=GOOD_CHAT | {"temperature": 6e-205})  # overflowed to NaN
    assert r.status_code == 200, r.text
    with pytest.raises(TightfitError, match="seed must be in"):
        from tightfit.runtime.sampling import SamplingParams

        SamplingParams(seed=-(2**63) - 1)


def test_found_by_fuzzing_damaged_json_in_a_gguf_tightfit_config(small_gguf, tmp_path):
    """One byte of the tightfit.config metadata (a JSON string) zeroed: json's JSONDecodeError escaped."""
    at = small_gguf.index(b'{"model_type"')
    path = tmp_path / "m.gguf"
    path.write_bytes(small_gguf[:at] + b"\0" + small_gguf[at + 1:])
    with pytest.raises(TightfitError, match="tightfit.config metadata is not valid JSON.*convert or export it again"):
        read_gguf_fully(path)


def test_found_by_fuzzing_a_metadata_string_that_is_not_utf8(small_gguf, tmp_path):
    """At 3,000 examples under a 4 GB address-space limit the architecture name read back starting with byte 0x80,
    and gguf-py's contents() raised UnicodeDecodeError ("can't decode byte 0x80 in position 0") from the
    architecture check; every metadata read now goes through one accessor that makes that a GGUFFormatError."""
    at = small_gguf.index(b"general.architecture") + len("general.architecture") + 4 + 8  # type, then length
    assert small_gguf[at:at + 5] == b"llama"
    path = tmp_path / "m.gguf"
    path.write_bytes(small_gguf[:at] + b"\x80" + small_gguf[at + 1:])
    with pytest.raises(TightfitError, match="metadata field 'general.architecture' could not be read "
                                            r"\(UnicodeDecodeError.*the file is damaged"):
        read_gguf_fully(path)


@pytest.mark.parametrize("layers", [2**31 - 1, 0])
def test_found_by_fuzzing_a_layer_count_the_tensors_do_not_hold(small_gguf, tmp_path, layers):
    """10,000 examples without coverage: one example ran for minutes at 2.3 GB and growing (at 10,000 under
    coverage the kernel killed it at 21 GB): a block count of about 2^31 had transformers build that many layer
    modules on the meta device. The count is now held to the file's tensors before anything is built."""
    key = b"llama.block_count"
    at = small_gguf.index(key) + len(key)
    assert struct.unpack("<I", small_gguf[at:at + 4])[0] == 4  # GGUF value type uint32, then the value
    path = tmp_path / "m.gguf"
    path.write_bytes(small_gguf[:at + 4] + struct.pack("<I", layers) + small_gguf[at + 8:])
    with pytest.raises(TightfitError, match=rf"claims {layers} decoder layers but the weights hold \d+ tensors"):
        read_gguf_fully(path)


def test_a_config_json_claiming_billions_of_layers_is_refused_before_building(tiny_models, tmp_path):
    from tightfit.models.lazy import lazy_hf

    bad = fresh_copy(tiny_models["llama"], tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2**31}))
    with pytest.raises(TightfitError, match=r"claims 2147483648 decoder layers but the weights hold \d+ tensors"):
        lazy_hf(bad)
    (bad / "config.json").write_text(json.dumps(config | {"num_local_experts": 2**40}))
    with pytest.raises(TightfitError, match=r"claims 1099511627776 experts per layer \(num_local_experts\)"):
        lazy_hf(bad)


def test_found_by_fuzzing_a_super_block_tensor_said_to_be_in_a_plain_format(super_artifact, tmp_path):
    """A manifest naming asym4-g32 for an asym4-k32 tensor: its packed 6-bit scale codes were read as [rows, 12]
    scales of 16 groups and dequantizing indexed past them (IndexError, at 300 examples)."""
    import tightfit
    from tightfit.errors import ArtifactError

    bad = fresh_copy(super_artifact, tmp_path / "art")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]["format"] = "asym4-g32"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(
            "tensor model.layers.0.mlp.down_proj.weight: asym4-g32 [256, 512]: its scales should be float [256, 16], "
            "found uint8 [256, 12]; the artifact is corrupt. Quantize it again.")):
        tightfit.load(bad)


def test_found_by_fuzzing_a_manifest_that_is_not_an_object_or_lacks_a_tensor(artifact, tmp_path):
    import tightfit
    from tightfit.runtime import load_runtime

    bad = tmp_path / "art"
    shutil.copytree(artifact, bad)
    (bad / "manifest.json").write_text("0")
    with pytest.raises(TightfitError, match="holds int, not a JSON object"):
        tightfit.load(bad)
    m = json.loads((artifact / "manifest.json").read_text())
    del m["tensors"]["model.embed_tokens.weight"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TightfitError, match="needs tensor model.embed_tokens.weight but the manifest does not list"):
        load_runtime(bad)
    m["tensors"]["model.norm.weight"]["shape"] = "64"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TightfitError, match="tensors.model.norm.weight.shape"):
        tightfit.load(bad)


@FUZZ
@given(data=st.data())
def test_damaged_config_json_gives_a_plan_spec_or_a_typed_error(data):
    """`tightfit plan config.json` reads any config: every field the planner sizes items from is checked."""
    from tightfit.planner.spec import CONFIGS, spec_from_config

    cfg = json.loads((CONFIGS / data.draw(st.sampled_from(sorted(p.name for p in CONFIGS.glob("*.json"))))).read_text())
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                         "num_key_value_heads", "head_dim", "intermediate_size", "num_experts",
                                         "num_experts_per_tok", "kv_lora_rank", "first_k_dense_replace"]))
        cfg = cfg | {key: data.draw(st.one_of(SCALAR, st.integers(-5, 10**13)))}
    else:
        cfg = mutate_json(cfg, data)
    outcome(spec_from_config, cfg, "fuzzed")


def read_hf_fully(folder: Path) -> None:
    """What every verb does first with a Hugging Face folder: its config, tokenizer and tensors, read lazily."""
    from tightfit.models import load_lazy

    lazy = load_lazy(folder)
    for name in [*lazy.loaders, *lazy.experts]:
        lazy.get(name)


@FUZZ
@given(data=st.data())
def test_damaged_hugging_face_folders_give_a_result_or_a_typed_error(tiny_models, tmp_path, data):
    """A safetensors file cut short or with header bytes changed, or a config.json with a field changed."""
    folder = fresh_copy(tiny_models["qwen2"], tmp_path / "m")
    weights = folder / "model.safetensors"
    what = data.draw(st.sampled_from(["truncate", "header-bytes", "header-length", "config"]))
    blob = bytearray(weights.read_bytes())
    if what == "truncate":
        weights.write_bytes(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))]))
    elif what == "header-bytes":
        n = struct.unpack("<Q", blob[:8])[0]
        for _ in range(data.draw(st.integers(1, 6))):
            blob[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(32, 126))
        weights.write_bytes(bytes(blob))
    elif what == "header-length":
        blob[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 7, 2**31, 2**40, 2**64 - 1])))
        weights.write_bytes(bytes(blob))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        key = data.draw(st.sampled_from(sorted(cfg)))
        cfg[key] = data.draw(st.one_of(SCALAR, st.integers(-5, 10**6)))
        (folder / "config.json").write_text(json.dumps(cfg))
    outcome(read_hf_fully, folder)


@pytest.mark.parametrize("change", ["truncated", "overwritten", "replaced", "deleted"])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_model_file_that_changes_under_a_running_server_is_harmless(artifact, small_gguf, tmp_path, change,
                                                                     streamed):
    """The runtime copies every weight into its own memory (or, under a weight budget, into its own unlinked
    scratch file) while loading: whatever happens to the model's files afterwards, answers stay the same."""
    from fastapi.testclient import TestClient

    from tightfit.runtime import load_runtime
    from tightfit.server.app import create_app

    for source in (fresh_copy(artifact, tmp_path / "art") / "weights.safetensors", tmp_path / "m.gguf"):
        if source.suffix == ".gguf":
            source.write_bytes(small_gguf)
        budget = (80_000 if source.suffix == ".gguf" else 40_000) if streamed else None  # every unit streamed
        lm = load_runtime(source.parent if source.suffix != ".gguf" else source, max_memory=budget)
        assert not streamed or lm.model.streamer.resident_bytes == 0
        with TestClient(create_app(lm.model, lm.tokenizer, "tiny", ctx=256, max_tokens_limit=8)) as c:
            def answer():
                r = c.post("/v1/completions", json=GOOD_COMPLETION | {"max_tokens": 6, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            before = answer()
            if change == "truncated":
                os.truncate(source, 100)
            elif change == "overwritten":
                with open(source, "r+b") as f:
                    f.seek(64)
                    f.write(b"\xff" * (source.stat().st_size - 64))
            elif change == "replaced":
                source.with_suffix(".new").write_bytes(b"not a model")
                os.replace(source.with_suffix(".new"), source)
            else:
                source.unlink()
            assert answer() == before
