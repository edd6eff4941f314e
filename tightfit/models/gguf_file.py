"""Reading GGUF files: validation, metadata, and tensors one at a time through the memory map."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import GGUFFormatError, UnsupportedArchitectureError

GGUF_MAGIC = b"GGUF"


class _Reader(gguf.GGUFReader):
    """gguf-py's reader over a plain array of the file's memory map: it slices the map once per metadata value,
    and a slice of an np.memmap costs 5x one of an ndarray (the 152k-token vocabulary and merges of a Qwen2.5
    file: 12.1 -> 3.7 s to open). The tensors' arrays are views of the same map."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)


_READERS: OrderedDict = OrderedDict()  # path -> (inode, size, reader): the last few opened


def _metadata_digest(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(n), digest_size=16).digest()


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open a GGUF file, checking its magic and that every tensor lies inside the file. The reader is kept for the
    next call on the same file while its metadata bytes (everything before the tensor data: what the reader parsed)
    and its size are unchanged: gguf-py parses the whole metadata on opening (17 s for a 152k-token vocabulary and
    its merges on 2 cores), and loading a model asks for it several times."""
    path = Path(path)
    st, name = path.stat(), str(path.resolve())
    held = _READERS.get(name)
    if held is not None:
        ino, size, reader = held
        if (ino, size) == (st.st_ino, st.st_size) and \
                _metadata_digest(path, reader.data_offset) == reader.metadata_digest:
            _READERS.move_to_end(name)
            return reader
        del _READERS[name]
    reader = _open_gguf(path)
    reader.metadata_digest = _metadata_digest(path, reader.data_offset)
    _READERS[name] = (st.st_ino, st.st_size, reader)
    while len(_READERS) > 2:
        _READERS.popitem(last=False)
    return reader


def release_readers() -> None:
    """Let the kept readers go (a loaded engine holds its own copies of the weights)."""
    _READERS.clear()


def _open_gguf(path: Path) -> gguf.GGUFReader:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{path} is not a GGUF file: it starts with {head!r}, expected the magic {GGUF_MAGIC!r}. "
            "Pass a .gguf model file or a Hugging Face model folder."
        )
    try:
        reader = _Reader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged headers
        raise GGUFFormatError(
            f"{path} is truncated or corrupt: its GGUF header could not be read ({type(e).__name__}: {e}). "
            "Download or export the file again."
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.size * t.data.itemsize != t.n_bytes:
            raise GGUFFormatError(
                f"{path} is truncated: tensor {t.name!r} needs bytes up to {end} but the file has {size}. "
                "Download or export the file again."
            )
    return reader


def field_contents(field, path: str | os.PathLike):
    """A metadata field's value, or None for a missing field; a damaged one (gguf-py decodes strings as UTF-8 and
    arrays by the types the file claims: UnicodeDecodeError, ValueError, IndexError) is a GGUFFormatError."""
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, TypeError, IndexError) as e:  # UnicodeDecodeError is a ValueError
        raise GGUFFormatError(f"{path}: its metadata field {getattr(field, 'name', '?')!r} could not be read "
                              f"({type(e).__name__}: {str(e)[:160]}); the file is damaged: download, convert or "
                              "export it again.") from None


def hf_config(path: Path, tokenizer: bool = True):
    """(config, tokenizer or None) of a GGUF file, read by transformers from its metadata. Damaged metadata (a
    vocabulary that does not match its merges, a missing or mistyped key) is a GGUFFormatError, whatever
    transformers raised."""
    from transformers import AutoConfig, AutoTokenizer
    reader = open_gguf(path)
    kept = _meta_dir(reader)
    held = _meta_cache(kept, path, tokenizer)
    if held is not None:
        return _restore_config(reader, held[0], path), held[1]
    what = "config"
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        what = "tokenizer"
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None
    except Exception as e:  # transformers' GGUF integration raises whatever its parsing hit
        if "is not supported yet" in str(e):
            field = reader.fields.get("general.architecture")
            raise GGUFFormatError(
                f"{path} is a GGUF of the {field_contents(field, path)!r} architecture, whose config and "
                f"tokenizer transformers' GGUF reader does not read ({str(e)[:120]}). tightfit writes such files "
                "for llama.cpp; read the model from its Hugging Face folder.") from e
        raise GGUFFormatError(
            f"{path}: the model {what} in its metadata could not be read ({type(e).__name__}: {str(e)[:200]}). "
            "The file is damaged or was written by a tool tightfit does not know; download or export it again."
        ) from e
    _meta_store(kept, config, tok)
    try:
        return _restore_config(reader, config, path), tok
    except GGUFFormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as e:  # a damaged field read there: a string that is
        # not UTF-8 (found by fuzzing: UnicodeDecodeError from gguf-py's contents()), a key or type changed
        raise GGUFFormatError(f"{path}: its metadata could not be read ({type(e).__name__}: {str(e)[:200]}); the file "
                              "is damaged: download, convert or export it again.") from e


KEEP_META = 32  # kept configs and tokenizers, most recent first


def _meta_dir(reader) -> Path:
    """Where the config and tokenizer that transformers built from a file's metadata are kept: transformers
    parses the file again for each (20 s apiece for a 152k-token vocabulary), the saved folders load in 1 s. Keyed
    by the file's size and metadata bytes (a copy elsewhere shares it), and transformers' version."""
    import transformers

    key = hashlib.blake2b(f"{reader.data.size}|{reader.metadata_digest.hex()}|{transformers.__version__}|1".encode(),
                          digest_size=12).hexdigest()
    return Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit")) / "gguf-meta" / key


def _meta_cache(d: Path, path: Path, tokenizer: bool):
    """(config, tokenizer or None) of the file at `path` from its kept folder d, or None where there is none (or it
    cannot be read)."""
    from transformers import AutoConfig, AutoTokenizer

    if not (d / "config.json").exists() or (tokenizer and not (d / "tokenizer_config.json").exists()):
        return None
    try:
        config, tok = AutoConfig.from_pretrained(d), AutoTokenizer.from_pretrained(d) if tokenizer else None
    except Exception:  # a damaged cache entry: built again from the file
        return None
    config._name_or_path = str(path.parent)  # as transformers names what it reads from the file
    if tok is not None:
        tok.name_or_path = str(path.parent)
    return config, tok


def _meta_store(d: Path, config, tok) -> None:
    """Keep the config (and tokenizer) in folder d for the next load, written whole or not at all, replacing a
    damaged or config-only entry; a cache that cannot be written (read-only home) is skipped."""
    import shutil
    import tempfile

    tmp = None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}-"))
        config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        kept = sorted((e for e in d.parent.iterdir() if not e.name.startswith(".")), key=lambda e: e.stat().st_mtime)
        for old in kept[:-KEEP_META]:  # the most recent files' only
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# the model type of a GGUF architecture that holds routed experts, and whether llama.cpp renormalizes their gates
MOE_TYPES = {"llama": ("mixtral", True), "qwen2moe": ("qwen2_moe", False), "qwen3moe": ("qwen3_moe", True)}


def _restore_config(reader, config, path):
    """What transformers' GGUF reader does not rebuild: the config fields tightfit wrote under tightfit.* keys
    (rope scaling that GGUF holds only as a tensor, Gemma's layer types, query_pre_attn_scalar, the MoE fields),
    and a mixture-of-experts config from the expert keys (transformers reads Mixtral as Llama and leaves
    Qwen2-MoE's expert sizes at their defaults). A foreign file with rope factors but no such key is run without
    them, and says so. Returns the config (a new one for MoE)."""
    import json
    import logging

    from transformers import AutoConfig

    field = reader.fields.get("tightfit.config")
    try:
        keep = json.loads(field_contents(field, path)) if field is not None else {}
    except (ValueError, TypeError) as e:  # a damaged byte in the JSON (found by fuzzing: JSONDecodeError escaped)
        raise GGUFFormatError(f"{path}: its tightfit.config metadata is not valid JSON ({e}); the file is damaged: "
                              "convert or export it again.") from None
    if not isinstance(keep, dict):
        raise GGUFFormatError(f"{path}: its tightfit.config metadata holds {type(keep).__name__}, not a JSON object; "
                              "the file is damaged: convert or export it again.")
    arch = field_contents(reader.fields["general.architecture"], path)

    def meta(key):
        return field_contents(reader.fields.get(f"{arch}.{key}"), path)

    if meta("expert_count"):
        if arch not in MOE_TYPES:
            raise GGUFFormatError(f"{path}: a {arch!r} file with routed experts; tightfit reads MoE GGUF files of "
                                  f"the architectures {sorted(MOE_TYPES)}.")
        model_type, norm = MOE_TYPES[arch]
        d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
        d |= {"num_experts_per_tok": meta("expert_used_count"), "norm_topk_prob": norm}
        if model_type == "mixtral":
            d["num_local_experts"] = meta("expert_count")
        else:
            d |= {"num_experts": meta("expert_count"), "moe_intermediate_size": meta("expert_feed_forward_length")}
        if meta("expert_shared_feed_forward_length"):
            d["shared_expert_intermediate_size"] = meta("expert_shared_feed_forward_length")
        d |= {k: v for k, v in keep.items() if k != "model_type"}
        return AutoConfig.for_model(keep.get("model_type", model_type), **d)
    for k, v in keep.items():
        if k != "model_type":
            setattr(config, k, v)
    if field is None and any(t.name == "rope_freqs.weight" for t in reader.tensors):
        logging.getLogger(__name__).warning(
            "%s holds rope frequency factors (Llama 3.1 rope scaling) that transformers' GGUF reader drops: "
            "tightfit runs it with plain rotary embeddings. Convert from the Hugging Face folder for exact "
            "long-context behaviour.", path)
    return config


def architecture(reader: gguf.GGUFReader, path: str | os.PathLike) -> str:
    """The GGUF architecture name, checked against the families tightfit handles."""
    arch = field_contents(reader.fields.get("general.architecture"), path)
    from .families import families

    known = sorted({f.gguf_arch for f in families().values()})
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(str(arch), known, n=1, cutoff=0.3)
        hint = f" The closest supported one is {close[0]!r}." if close else ""
        raise UnsupportedArchitectureError(
            f"{path} holds a {arch!r} model; tightfit handles GGUF architectures {known}.{hint} Convert the model "
            f"to one of those, or add a module for {arch!r} under tightfit/models/families/."
        )
    return arch


_BLOCK_DEQUANT = {}


def _register(qtype):
    def wrap(fn):
        _BLOCK_DEQUANT[qtype] = fn
        return fn

    return wrap


# Fast torch paths for the common block types (gguf-py's numpy versions are the reference in tests).
@_register(gguf.GGMLQuantizationType.Q8_0)
def _q8_0(raw: torch.Tensor) -> torch.Tensor:  # block: fp16 d, 32 x int8
    d = raw[:, :2].contiguous().view(torch.float16).float()
    q = raw[:, 2:].contiguous().view(torch.int8).float()
    return q * d


@_register(gguf.GGMLQuantizationType.Q4_0)
def _q4_0(raw: torch.Tensor) -> torch.Tensor:  # block: fp16 d, 16 bytes of nibbles; w = (q - 8) d
    d = raw[:, :2].contiguous().view(torch.float16).float()
    qs = raw[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return (q - 8) * d


@_register(gguf.GGMLQuantizationType.Q4_1)
def _q4_1(raw: torch.Tensor) -> torch.Tensor:  # block: fp16 d, fp16 m, 16 bytes of nibbles; w = q d + m
    d = raw[:, :2].contiguous().view(torch.float16).float()
    m = raw[:, 2:4].contiguous().view(torch.float16).float()
    qs = raw[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return q * d + m


def dequantize(t: gguf.ReaderTensor) -> torch.Tensor:
    """Dequantize one GGUF tensor to fp32, shaped as in PyTorch (rows = output features)."""
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.BF16:
        raw = torch.from_numpy(np.array(t.data)).view(torch.bfloat16)
        return raw.float().reshape(shape)
    fn = _BLOCK_DEQUANT.get(qtype)
    if fn is None:
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)).reshape(shape)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(-1, block_bytes))
    return fn(raw).reshape(shape)

