import gguf
import numpy as np
import pytest
import torch

import tightfit
from tightfit.eval.windows import tokenize
from tightfit.export.gguf import write_gguf_f16
from tightfit.models.gguf_file import dequantize, open_gguf
from tightfit.models.hf import save_hf

from .conftest import ARCHS


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_hf_folder(tiny_models, arch, short_eval_text):
    lm = tightfit.load(tiny_models[arch])
    assert lm.format == "hf" and lm.config.model_type == arch
    assert lm.config.num_hidden_layers == 2 and lm.config.hidden_size == 64
    out = logits(lm, tokenize(lm.tokenizer, short_eval_text)[:40])
    assert out.shape == (40, lm.config.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_hf_round_trip_is_exact(tiny_models, arch, tmp_path, short_eval_text):
    lm = tightfit.load(tiny_models[arch])
    save_hf(lm, tmp_path / "copy")
    again = tightfit.load(tmp_path / "copy")
    ids = tokenize(lm.tokenizer, short_eval_text)[:64]
    assert tokenize(again.tokenizer, short_eval_text) == tokenize(lm.tokenizer, short_eval_text)
    assert torch.equal(logits(lm, ids), logits(again, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f16_round_trip(tiny_models, arch, tmp_path, short_eval_text):
    lm = tightfit.load(tiny_models[arch])
    path = write_gguf_f16(lm, tmp_path / "m.gguf")
    back = tightfit.load(path)
    assert back.format == "gguf" and back.config.model_type == arch
    ids = tokenize(lm.tokenizer, short_eval_text)
    assert tokenize(back.tokenizer, short_eval_text) == ids
    # every weight equals the original rounded to fp16 (q/k rows permuted there and back)
    for name, p in lm.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], p.half().float()), name
    a, b = logits(lm, ids[:64]), logits(back, ids[:64])
    assert (a - b).abs().max() < 2e-2
    assert back.tokenizer.chat_template == lm.tokenizer.chat_template


def test_gguf_f16_of_gemma3_reads_back_as_the_same_model(tiny_models, tmp_path):
    """Gemma's (1 + w) norms are stored as full gains and its config fields transformers' GGUF reader drops
    (query_pre_attn_scalar, layer types) travel under tightfit.config."""
    lm = tightfit.load(tiny_models["gemma3_text"])
    write_gguf_f16(lm, tmp_path / "g.gguf")
    back = tightfit.load(tmp_path / "g.gguf")
    ids = list(range(5, 80))
    assert (logits(lm, ids) - logits(back, ids)).abs().max() < 2e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16"])
def test_dequantize_matches_gguf_py(tmp_path, qtype):
    qt = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 256)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    if qtype == "BF16":
        raw = torch.from_numpy(w).bfloat16().view(torch.int16).numpy()
        writer.add_tensor("t", raw, raw_shape=w.shape, raw_dtype=qt)
    elif qtype == "F16":
        writer.add_tensor("t", w.astype(np.float16))
    else:
        writer.add_tensor("t", gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = open_gguf(tmp_path / "q.gguf").tensors[0]
    ours = dequantize(t)
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, 256)
    assert ours.shape == (8, 256) and ours.dtype == torch.float32
    assert np.array_equal(ours.numpy(), ref.astype(np.float32))


def test_convert_cli(tiny_models, tmp_path, short_eval_text, capsys):
    from tightfit.cli import main
    from tightfit.data import sha256_text
    from tightfit.eval import evaluate

    src = str(tiny_models["llama"])
    assert main(["convert", src, "-o", str(tmp_path / "hf")]) == 0
    assert main(["convert", src, "--to", "gguf-f16", "--offgrid", "0.1", "-o", str(tmp_path / "og.gguf")]) == 0
    assert main(["convert", src, "-o", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    base = tightfit.load(src)
    for out in ("hf", "og.gguf"):
        r = evaluate(tightfit.load(tmp_path / out), short_eval_text, text_name="t",
                     text_sha256=sha256_text(short_eval_text), ctx=64, base=base)
        assert r.kld_max < 1e-3 and r.top1_agreement > 0.99, out  # exact copy / fp16 of a function-preserving rescale


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_convert_streams_layer_by_layer_and_equals_the_whole_model_path(tiny_models, arch, tmp_path):
    # `tightfit convert --offgrid` writes one shard per decoder layer; every tensor must equal what the
    # whole-model offgrid gives (same draws, same order), and the sharded folder loads in transformers
    import json

    from tightfit.cli import main
    from tightfit.quant.equivalence import offgrid

    src = tiny_models[arch]
    assert main(["convert", str(src), "--offgrid", "0.1", "--seed", "4", "-o", str(tmp_path / "og")]) == 0
    index = json.loads((tmp_path / "og" / "model.safetensors.index.json").read_text())
    lm = tightfit.load(src)
    L = lm.config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == L + 1
    with torch.no_grad():
        offgrid(lm.model.state_dict(), lm.config, sigma=0.1, seed=4)
    back = tightfit.load(tmp_path / "og")
    want, got = lm.model.state_dict(), back.model.state_dict()
    for name in index["weight_map"]:
        assert torch.equal(got[name], want[name]), name
    ids = list(range(5, 40))
    assert torch.equal(logits(back, ids), logits(lm, ids))


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_convert_to_gguf_streams_and_writes_the_whole_model_paths_bytes(tiny_models, source, tmp_path):
    """`convert --to gguf-f16` reads one layer at a time; the file is byte-identical to writing the loaded
    (off-grid) model whole, from an HF folder or from a GGUF (whose tokenizer fields are copied)."""
    from tightfit.cli import main
    from tightfit.quant.equivalence import offgrid

    src = tiny_models["llama"]
    if source == "gguf":
        src = write_gguf_f16(tightfit.load(src), tmp_path / "src.gguf")
    out = tmp_path / "stream.gguf"
    assert main(["convert", str(src), "--to", "gguf-f16", "--offgrid", "0.1", "--seed", "3", "-o", str(out)]) == 0
    lm = tightfit.load(src)
    lm.source = str(src)
    with torch.no_grad():
        offgrid(lm.model.state_dict(), lm.config, sigma=0.1, seed=3)
    whole = write_gguf_f16(lm, tmp_path / "whole.gguf")
    assert out.read_bytes() == whole.read_bytes()


def test_gguf_metadata_is_parsed_once_and_its_config_and_tokenizer_kept(tiny_models, tmp_path, monkeypatch):
    """A GGUF's reader is kept while the file's metadata bytes are unchanged, and the config and tokenizer that
    transformers built from it are kept on disk: the next load reads no metadata through transformers (20 s
    apiece for a 152k-token vocabulary) and gives the same config and token ids."""
    from transformers import AutoConfig, AutoTokenizer

    from tightfit.models import gguf_file

    monkeypatch.setenv("TIGHTFIT_CACHE", str(tmp_path / "cache"))
    path = write_gguf_f16(tightfit.load(tiny_models["llama"]), tmp_path / "m.gguf")
    reader = open_gguf(path)
    assert open_gguf(path) is reader
    config, tok = gguf_file.hf_config(path)
    kept = list((tmp_path / "cache" / "gguf-meta").iterdir())
    assert len(kept) == 1 and (kept[0] / "config.json").exists()

    parsed = []
    for cls in (AutoConfig, AutoTokenizer):
        original = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _f=original, **k: (parsed.append(k.get("gguf_file")), _f(*a, **k))[1])
    config2, tok2 = gguf_file.hf_config(path)
    assert parsed and not any(parsed)  # every read from the kept folder, none with gguf_file
    assert {k: v for k, v in config2.to_dict().items() if k != "transformers_version"} == \
        {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    text = "The economy grew, and the union <s> is strong.</s>"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    chat = [{"role": "user", "content": "hello"}]
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert (tok2.bos_token_id, tok2.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)

    (kept[0] / "config.json").write_text("{")  # a damaged kept entry: read from the file again, and kept anew
    parsed.clear()
    assert gguf_file.hf_config(path)[0].num_hidden_layers == config.num_hidden_layers
    assert parsed.count("m.gguf") >= 2
    assert AutoConfig.from_pretrained(kept[0]).num_hidden_layers == config.num_hidden_layers  # and kept anew

    blob = bytearray(path.read_bytes())  # the metadata changed in place, same size: read again
    at = blob.index(b"content")
    blob[at:at + 7] = b"CONTENT"
    path.write_bytes(bytes(blob))
    again = open_gguf(path)
    assert again is not reader
    assert "CONTENT" in gguf_file.field_contents(again.fields["tokenizer.chat_template"], path)
