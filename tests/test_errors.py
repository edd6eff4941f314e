"""Bad input gets a typed error whose message says what was expected and what to do."""

import re
import shutil

import gguf
import numpy as np
import pytest

import tightfit
from tightfit.cli import main
from tightfit.errors import (
    GGUFFormatError,
    ModelNotFoundError,
    NotAModelError,
    OutputExistsError,
    TextError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from tightfit.eval import evaluate
from tightfit.export.gguf import write_gguf_f16
from tightfit.models.hf import save_hf

from .conftest import build_tiny


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=re.escape(f"model '{tmp_path}/nope' not found: no such file or "
                                                           "folder, and not a known model name (smollm2-135m)")):
        tightfit.load(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError, match=re.escape(f"{tmp_path} is a folder but not a model: it has no "
                                                       "config.json")):
        tightfit.load(tmp_path)


def test_folder_without_weights(tiny_models, tmp_path):
    (tmp_path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(NotAModelError, match="has a config.json but no weights"):
        tightfit.load(tmp_path)


def test_file_that_is_not_a_model(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\x00\x01junk")
    with pytest.raises(NotAModelError, match=r"is not a model: expected a \.gguf file or a Hugging Face model folder"):
        tightfit.load(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFFormatError, match=re.escape(f"{p} is not a GGUF file: it starts with b'GGML', expected "
                                                        "the magic b'GGUF'")):
        tightfit.load(p)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    return write_gguf_f16(tightfit.load(tiny_models["llama"]), tmp_path_factory.mktemp("g") / "tiny.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFFormatError, match=re.escape(str(p)) + r" is truncated.*Download or export the file again"):
        tightfit.load(p)


def test_unsupported_architecture_hf(tiny_models, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError,
                       match=re.escape(f"{tmp_path} holds a 'gpt2' model; tightfit handles model types "
                                       "['llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text', 'phi3', 'mixtral'")):
        tightfit.load(tmp_path)


def test_unsupported_architecture_gguf(tmp_path):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(p, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"{p} holds a 'gpt2' model; tightfit handles "
                                                                     "GGUF architectures ['gemma3', 'llama', 'olmoe', 'phi3', "
                                                                     "'qwen2', 'qwen2moe', 'qwen3', 'qwen3moe']")):
        tightfit.load(p)


def test_text_shorter_than_two_windows(tiny_models):
    lm = tightfit.load(tiny_models["qwen2"])
    with pytest.raises(TextError, match=r"the text is too short: it has \d+ tokens, but 2 windows of --ctx 512 need "
                                        r"1024\. Use a longer text or a smaller --ctx\."):
        evaluate(lm, "A short text. " * 20, text_name="t", text_sha256="x", ctx=512)


def test_base_with_other_tokenizer(tiny_models, tmp_path, short_eval_text):
    from tests.conftest import make_tokenizer

    other = build_tiny("llama", tmp_path / "other")
    make_tokenizer(add_bos=True, seed_text=short_eval_text).save_pretrained(other)  # same size, other merges
    model, base = tightfit.load(tiny_models["llama"]), tightfit.load(other)
    with pytest.raises(TokenizerMismatchError, match=re.escape(f"BASE {other} and MODEL {tiny_models['llama']} do "
                                                               "not share a tokenizer (different token tables)")):
        evaluate(model, short_eval_text, text_name="t", text_sha256="x", ctx=64, base=base)


def test_base_with_other_vocab_size(tiny_models, short_eval_text):
    model, base = tightfit.load(tiny_models["llama"]), tightfit.load(tiny_models["gemma3_text"])
    base.model.config.vocab_size += 1  # as if BASE had a padded output head
    with pytest.raises(TokenizerMismatchError, match=r"do not share a tokenizer \(output vocabularies of 320 and 321 entries"):
        evaluate(model, short_eval_text, text_name="t", text_sha256="x", ctx=64, base=base)


def test_output_exists_is_not_overwritten(tiny_models, tmp_path):
    lm = tightfit.load(tiny_models["qwen2"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=re.escape(f"{out} already exists; choose another output path or pass "
                                                          "--force to replace it.")):
        save_hf(lm, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_hf(lm, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failed_write_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    lm = tightfit.load(tiny_models["llama"])

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(lm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_typed_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.gguf"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tightfit eval: error: model ") and "not found" in err


def test_cli_missing_text_file(tiny_models, capsys):
    assert main(["eval", str(tiny_models["llama"]), "--text", "/no/such.txt"]) == 2
    assert "--text '/no/such.txt': no such file" in capsys.readouterr().err


def test_cli_chunks_below_two(tiny_models, capsys):
    assert main(["eval", str(tiny_models["llama"]), "--ctx", "64", "--chunks", "1", "--json"]) == 2
    assert "--chunks must be at least 2, got 1" in capsys.readouterr().err


def test_llama_cpp_build_with_amx_is_refused_before_it_can_crash(monkeypatch):
    from tightfit.errors import LlamaCppBuildError
    from tightfit.eval import llama_cpp

    info = "CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    monkeypatch.setattr(llama_cpp, "_system_info", lambda: info)
    monkeypatch.delenv("TIGHTFIT_ALLOW_LLAMA_AMX", raising=False)
    with pytest.raises(LlamaCppBuildError, match=r"built with AMX.*--no-cache-dir --force-reinstall"):
        llama_cpp.check_build()
    monkeypatch.setenv("TIGHTFIT_ALLOW_LLAMA_AMX", "1")
    llama_cpp.check_build()
    monkeypatch.delenv("TIGHTFIT_ALLOW_LLAMA_AMX")
    info = "CPU : AVX512 = 1 | AVX512_VNNI = 1 | REPACK = 1 | "
    llama_cpp.check_build()


def test_llama_cpp_built_for_another_cpu_is_refused_not_a_crash(monkeypatch, tmp_path):
    """A wheel compiled for AVX-512 dies with an illegal instruction on an AVX2-only CPU, taking the process with
    it: check_build finds that in a subprocess and raises a typed error that says how to rebuild."""
    from tightfit.errors import LlamaCppBuildError
    from tightfit.eval import llama_cpp

    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    llama_cpp._system_info.cache_clear()
    try:
        with pytest.raises(LlamaCppBuildError, match=r"built for another CPU.*llama-cmake-args.sh.*--force-reinstall"):
            llama_cpp.check_build()
    finally:
        llama_cpp._system_info.cache_clear()


@pytest.mark.parametrize("verb", ["quantize", "convert"])
def test_a_write_that_runs_out_of_room_is_a_typed_error_and_leaves_nothing(tiny_models, tmp_path, verb):
    """A file-size limit (RLIMIT_FSIZE, as a full disk would) stops the write midway: exit 2 with a message that
    says what to do, and neither the output nor its temporary folder is left behind."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "out"
    args = {"quantize": ["quantize", str(tiny_models["llama"]), "--method", "rtn", "-o", str(out)],
            "convert": ["convert", str(tiny_models["llama"]), "-o", str(out)]}[verb]
    r = subprocess.run([sys.executable, "-m", "tightfit.cli", *args], preexec_fn=limit, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"could not write {out}: File too large" in r.stderr and "Nothing was left behind" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_quantize_leaves_nothing_that_looks_complete_and_a_rerun_starts_clean(tiny_models, tmp_path):
    """SIGKILL while the artifact is being written: either the whole artifact was already published, or only a
    hidden partial folder is left; a rerun removes the dead run's partial folder and publishes a whole artifact."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "tightfit.cli", "quantize", str(tiny_models["llama"]), "--method", "gptq",
           "--calib-samples", "8", "--calib-ctx", "64", "-o", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.partial-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if out.exists():  # the kill came after the rename: then it is whole
        tightfit.load(out)
        shutil.rmtree(out)
    left = list(tmp_path.iterdir())
    assert all(x.name.startswith(f".art.partial-{p.pid}-") for x in left)
    if not left:  # make the dead run's leftover explicit, as a kill mid-write leaves it
        (tmp_path / f".art.partial-{p.pid}-x").mkdir()
        (tmp_path / f".art.partial-{p.pid}-x" / "weights.safetensors").write_bytes(b"half")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]  # the killed run's partial folder is gone
    tightfit.load(out)


@pytest.mark.parametrize("verb", ["convert-hf", "convert-gguf", "export-gguf"])
def test_a_killed_convert_or_export_leaves_nothing_that_looks_complete(tiny_models, tmp_path, verb):
    """SIGKILL while convert or export writes: the output is whole or absent, only the dead run's hidden partial
    is left beside it, and a rerun removes that and publishes a whole output."""
    import signal
    import subprocess
    import sys
    import time

    src = tiny_models["llama"]
    if verb == "export-gguf":
        from tightfit.formats import WeightFormat
        from tightfit.quant.api import quantize
        from tightfit.quant.config import QuantConfig

        quantize(src, QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True), calib_generated=0.0),
                 tmp_path / "art")
        src = tmp_path / "art"
    work = tmp_path / "out"
    work.mkdir()
    out = work / ("m" if verb == "convert-hf" else "m.gguf")
    cmd = [sys.executable, "-m", "tightfit.cli", *{"convert-hf": ["convert", str(src), "-o", str(out)],
                                                   "convert-gguf": ["convert", str(src), "--to", "gguf-f16", "-o",
                                                                    str(out)],
                                                   "export-gguf": ["export", str(src), "--format", "gguf", "-o",
                                                                   str(out)]}[verb]]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(work.glob(f".{out.name}.partial-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if out.exists():  # the kill came after the rename: then it is whole
        tightfit.load(out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    left = list(work.iterdir())
    assert all(x.name.startswith(f".{out.name}.partial-{p.pid}-") for x in left), left
    if not left:  # make the dead run's leftover explicit, as a kill mid-write leaves it
        (work / f".{out.name}.partial-{p.pid}-x").write_bytes(b"half")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert sorted(x.name for x in work.iterdir()) == [out.name]
    tightfit.load(out)


def test_a_killed_fit_resumes_and_leaves_only_its_output(tiny_models, tmp_path):
    """SIGKILL during fit, once its quantized artifact is staged: no output folder, the stages kept; a rerun
    reuses what was staged, publishes the output and removes the stages and any partial."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "fit"
    cmd = [sys.executable, "-m", "tightfit.cli", "fit", str(tiny_models["llama"]), "--hardware", "ddr5-desktop",
           "--max-memory", "2.6MB", "--context", "256", "-o", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = tmp_path / ".fit.stages" / "artifact" / "manifest.json"
    deadline = time.time() + 300
    while not staged.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_mid_run = not out.exists()
    if killed_mid_run:
        assert staged.exists()
    r = subprocess.run(cmd + ([] if killed_mid_run else ["--force"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    if killed_mid_run:
        assert "reusing" in r.stderr + r.stdout, r.stderr[-1500:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["fit"]
    assert (out / "report.md").is_file() and (out / "artifact" / "manifest.json").is_file()


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: every output of the tiny model is larger, so each write fills it (skipped where this
    process may not mount, e.g. without root)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("verb", ["quantize", "convert-hf", "convert-gguf", "export-gguf", "plan"])
def test_a_full_disk_is_a_typed_error_and_leaves_nothing(tiny_models, tmp_path, full_disk, verb):
    """A real full disk (ENOSPC from a small tmpfs) in the middle of each writer: exit 2, a message that says what
    happened and what to do, and the disk as empty as before (no partial file or folder)."""
    import subprocess
    import sys

    src = tiny_models["llama"]
    if verb == "export-gguf":
        from tightfit.formats import WeightFormat
        from tightfit.quant.api import quantize
        from tightfit.quant.config import QuantConfig

        src = tmp_path / "art"
        quantize(tiny_models["llama"], QuantConfig(method="rtn", fmt=WeightFormat(4, 32, True), calib_generated=0.0),
                 src)
    out = full_disk / {"quantize": "art", "convert-hf": "m", "plan": "plan.json"}.get(verb, "m.gguf")
    args = {"quantize": ["quantize", str(src), "--method", "rtn", "-o", str(out)],
            "convert-hf": ["convert", str(src), "-o", str(out)],
            "convert-gguf": ["convert", str(src), "--to", "gguf-f16", "-o", str(out)],
            "export-gguf": ["export", str(src), "--format", "gguf", "-o", str(out)],
            "plan": ["plan", str(src), "--hardware", "h100-sxm", "-o", str(out)]}[verb]
    if verb == "plan":  # a plan is small: fill the disk first, as another job would
        _fill(full_disk / "ballast")
    r = subprocess.run([sys.executable, "-m", "tightfit.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"could not write {out}: No space left on device" in r.stderr, r.stderr[-2000:]
    assert "Nothing was left behind" in r.stderr
    assert sorted(x.name for x in full_disk.iterdir()) == (["ballast"] if verb == "plan" else [])


def _fill(path) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC: full
            pass
