"""Build the runtime Engine from a tightfit artifact, a GGUF file (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K codes are run as stored;
other quantized types re-quantized to 8 bits, the error reported) or a Hugging Face folder (bf16)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..formats.weight import WeightFormat
from ..models import resolve_source
from ..models.arch import hf_to_gguf_names, unpermute_qk
from ..quant.core import QuantizedWeight, rtn
from .linear import VNNI_KINDS, Concat, RuntimeLinear, from_dense, from_quantized
from .model import Embedding, Engine, Layer, ModelArgs

Weight = QuantizedWeight | torch.Tensor
log = logging.getLogger(__name__)

# GGUF block types whose codes are a tightfit format: (format, bytes of scale(s) before the codes)
GGUF_CODES = {gguf.GGMLQuantizationType.Q8_0: WeightFormat(8, 32, True),
              gguf.GGMLQuantizationType.Q4_0: WeightFormat(4, 32, True),
              gguf.GGMLQuantizationType.Q4_1: WeightFormat(4, 32, False),
              gguf.GGMLQuantizationType.Q5_0: WeightFormat(5, 32, True),
              gguf.GGMLQuantizationType.Q5_1: WeightFormat(5, 32, False),
              gguf.GGMLQuantizationType.Q4_K: WeightFormat(4, 32, False, superblock=True),
              gguf.GGMLQuantizationType.Q5_K: WeightFormat(5, 32, False, superblock=True),
              gguf.GGMLQuantizationType.Q6_K: WeightFormat(6, 16, True, superblock=True),
              gguf.GGMLQuantizationType.IQ4_NL: WeightFormat(4, 32, True, grid="nl"),
              gguf.GGMLQuantizationType.IQ4_XS: WeightFormat(4, 32, True, superblock=True, grid="nl")}


# GGUF types kept as they are (float); every other type the kernels lack is re-quantized to REQUANT at load
DENSE_GGUF = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
REQUANT = WeightFormat(8, 32, True)


def gguf_quantized(t, data: np.ndarray | None = None, shape: tuple[int, int] | None = None) -> QuantizedWeight | None:
    """The codes of a Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS GGUF tensor as a QuantizedWeight (bit-exact), or None for other
    types. shape: (rows, columns) of `data` where it is one slice of the tensor (an expert of a stacked 3-D tensor)."""
    fmt = GGUF_CODES.get(t.tensor_type)
    if fmt is None:
        return None
    n, k = shape or (int(s) for s in reversed(t.shape.tolist()))
    if fmt.bits == 6:
        from ..formats.ggml import from_q6_blocks, super_scales

        raw = t.data if data is None else data
        codes, scales = from_q6_blocks(raw, n, k)
        return QuantizedWeight(fmt, torch.from_numpy(codes), torch.from_numpy(scales), None,
                               supers=super_scales(raw, "Q6_K", n, k))
    if fmt.grid == "nl":
        from ..formats.ggml import from_iq4_blocks

        codes, scales = from_iq4_blocks(t.data if data is None else data, t.tensor_type.name, n, k)
        return QuantizedWeight(fmt, torch.from_numpy(codes), torch.from_numpy(scales), None)
    if fmt.bits == 5:
        from ..formats.ggml import from_q5_blocks

        codes, scales, mins = from_q5_blocks(t.data if data is None else data, t.tensor_type.name, n, k)
        return QuantizedWeight(fmt, torch.from_numpy(codes), torch.from_numpy(scales),
                               None if mins is None else torch.from_numpy(mins))
    if fmt.superblock:
        from ..formats.ggml import from_k_blocks, super_scales

        raw = t.data if data is None else data
        codes, scales, mins = from_k_blocks(raw, t.tensor_type.name, n, k)
        return QuantizedWeight(fmt, torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(mins),
                               supers=super_scales(raw, t.tensor_type.name, n, k))
    raw = torch.from_numpy(np.array(t.data if data is None else data, dtype=np.uint8).reshape(n, k // 32, -1))
    d = raw[..., :2].contiguous().view(torch.float16)[..., 0]
    if fmt.bits == 8:
        q = raw[..., 2:].contiguous().view(torch.int8).to(torch.int16)
        return QuantizedWeight(fmt, q.reshape(n, k), d, None)
    qs = raw[..., 2:] if fmt.symmetric else raw[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), -1).to(torch.int16)
    if fmt.symmetric:
        return QuantizedWeight(fmt, (q - 8).reshape(n, k), d, None)
    m = raw[..., 2:4].contiguous().view(torch.float16)[..., 0]
    return QuantizedWeight(fmt, q.reshape(n, k), d, m)


def _rows(w: Weight, idx: torch.Tensor) -> Weight:
    if isinstance(w, torch.Tensor):
        return w[idx]
    codes = w.codes[idx]
    return QuantizedWeight(w.fmt, codes, w.scales[idx], None if w.mins is None else w.mins[idx], w.g_idx)


def _gguf_tensor_bytes(path: Path, t, part: int = 0, parts: int = 1) -> np.ndarray:
    """A tensor's raw bytes (or its part-th of `parts` equal slices: one expert of a stacked 3-D tensor) by a plain
    read, not the memory map, whose touched pages would stay resident."""
    n = int(t.n_bytes) // parts
    with open(path, "rb") as f:
        f.seek(int(t.data_offset) + part * n)
        return np.frombuffer(f.read(n), dtype=np.uint8)


def _gguf_source(path: Path):
    from ..models.gguf_file import open_gguf
    from ..models.lazy import lazy_gguf

    lazy = lazy_gguf(path)
    config = lazy.config
    tensors = {t.name: t for t in open_gguf(path).tensors}
    from ..models.families import family_of

    fam = family_of(config, str(path))
    names = hf_to_gguf_names(lazy.loaders.keys(), fam.gguf_arch, config.num_hidden_layers)

    moe = fam.moe
    expert = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

    def get_expert(name: str) -> Weight:
        i, e, proj = expert.match(name).groups()
        t = tensors[fam.gguf_expert_name(int(i), proj)]
        if t.tensor_type not in GGUF_CODES:
            return lazy.experts[name]()
        E, rows, cols = (int(x) for x in reversed(t.shape.tolist()))
        return gguf_quantized(t, _gguf_tensor_bytes(path, t, int(e), E), (rows, cols))

    requantized: dict[str, dict] = {}

    def get(name: str) -> Weight:
        if moe is not None and name in lazy.experts:
            return get_expert(name)
        t = tensors[names[name]]
        if t.tensor_type not in GGUF_CODES:
            w = lazy.loaders[name]()
            if t.tensor_type in DENSE_GGUF or w.ndim != 2 or not REQUANT.fits(tuple(w.shape)):
                return w
            # a lossy type the kernels do not hold (Q2_K, Q3_K, IQ1-IQ3): 8-bit codes of the file's own grid
            # run on the int8 kernel, where the dense bf16 weight read twice the bytes per token
            qw = rtn(w.float(), REQUANT)
            requantized[name] = {"type": t.tensor_type.name, "sqnr_db": qw.error["sqnr_db"]}
            return qw
        qw = gguf_quantized(t, _gguf_tensor_bytes(path, t))
        if fam.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            qw = _rows(qw, unpermute_qk(torch.arange(qw.shape[0])[:, None], heads)[:, 0])
        return qw

    get.requantized = requantized
    return config, lazy.tokenizer, get, set(lazy.loaders) | set(lazy.experts), None


def _artifact_source(path: Path):
    from transformers import AutoConfig, AutoTokenizer

    from ..quant.artifact import open_quantized

    manifest, get = open_quantized(path)
    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path), get, set(manifest["tensors"]), manifest


def _hf_source(path: Path):
    from ..models.lazy import lazy_hf

    lazy = lazy_hf(path)
    return lazy.config, lazy.tokenizer, lazy.get, set(lazy.loaders) | set(lazy.experts), None


def _rows_slice(w: Weight, start: int, end: int) -> Weight:
    if isinstance(w, torch.Tensor):
        return w[start:end]
    return QuantizedWeight(w.fmt, w.data[start:end], w.scales[start:end], None if w.mins is None else w.mins[start:end],
                           w.g_idx, in_features=w.in_features, packed=w.packed)


def fuse(parts: list[Weight], biases: list[torch.Tensor | None] | None = None, kernel: str = "auto") -> RuntimeLinear:
    """One runtime linear for weights that read the same input (q/k/v, gate/up), stacked along the output."""
    bias = None if not biases or biases[0] is None else torch.cat(biases)
    if len(parts) == 1:
        return _linear(parts[0], kernel, bias)
    if all(isinstance(p, torch.Tensor) for p in parts):
        return from_dense(torch.cat(parts), bias)
    qs = [p if isinstance(p, QuantizedWeight) else None for p in parts]
    # the runtime holds every group's scale as a number: a super-block format stacks with its plain form
    same = all(q is not None and q.fmt.flat() == qs[0].fmt.flat() and q.g_idx is None for q in qs)
    if same:
        fmt = qs[0].fmt if all(q.fmt == qs[0].fmt for q in qs) else qs[0].fmt.flat()
        stacked = QuantizedWeight(fmt, torch.cat([q.codes for q in qs]), torch.cat([q.scales.float() for q in qs]),
                                  None if qs[0].mins is None else torch.cat([q.mins.float() for q in qs]))
        return from_quantized(stacked, bias, kernel=kernel)
    # mixed formats: run each part and concatenate (a few more ops per token)
    return Concat([_linear(p, kernel) for p in parts], bias)


def _linear(w: Weight, kernel: str = "auto", bias: torch.Tensor | None = None) -> RuntimeLinear:
    return from_quantized(w, bias, kernel=kernel) if isinstance(w, QuantizedWeight) else from_dense(w, bias)


def build_engine(config, get, names: set[str], kv_format: str = "bf16", progress: bool = False,
                 info: dict | None = None, max_memory: int | None = None, kernel: str = "auto",
                 round_dense: WeightFormat | None = None) -> Engine:
    """Turn per-tensor weights (quantized or float, read one layer at a time through `get`) into an Engine.
    With max_memory, weights beyond the budget are streamed from a scratch file every token. round_dense: the
    decoder layers' float linears are rounded to this format (RTN) as they load, to run on the int8/int4 kernel
    instead of bf16 GEMMs; quantized ones, norms, routers, the embedding and the head stay as they are."""
    from ..io import release_freed_memory_eagerly, return_free_heap
    from .stream import DiskEmbedding, StreamedHead, Streamer

    release_freed_memory_eagerly()  # conversion temporaries go back to the OS: resident size tracks the model
    from ..models.families import family_of

    fam = family_of(config, "the runtime's model")
    args = ModelArgs.from_config(config)
    streamer = Streamer() if max_memory is not None else None
    layers, errs = [], {}

    def gain(name):  # a norm's full gain (Gemma stores w of a (1 + w) gain)
        w = get(name).float()
        return w + fam.norm_offset if fam.norm_offset else w

    for i in tqdm(range(args.n_layers), desc="preparing runtime", unit="layer", disable=not progress):
        p = f"model.layers.{i}."

        def group(ns):
            ws = [get(f"{p}{n}.weight") for n in ns]
            if round_dense is not None:
                ws = [rtn(w, round_dense, report=False)
                      if isinstance(w, torch.Tensor) and round_dense.fits(tuple(w.shape)) else w for w in ws]
            bs = [f"{p}{n}.bias" for n in ns]
            if not any(b in names for b in bs):
                return fuse(ws, None, kernel)
            return fuse(ws, [get(b).float() if b in names else torch.zeros(w.shape[0]) for b, w in zip(bs, ws)],
                        kernel)

        moe = _moe_block(fam, config, i, p, get, group) if fam.is_moe_layer(config, i) else None
        layer = Layer(
            attn_norm=gain(p + fam.attn_norm + ".weight"), qkv=group(fam.qkv), o=group((fam.o,)),
            mlp_norm=gain(p + fam.mlp_norm + ".weight"), moe=moe,
            gate_up=None if moe else group(fam.gate_up), down=None if moe else group((fam.down,)),
            **{role: gain(f"{p}{n}.weight") for role, n in (("q_norm", fam.q_norm), ("k_norm", fam.k_norm),
                                                            ("post_attn_norm", fam.post_attn_norm),
                                                            ("post_mlp_norm", fam.post_mlp_norm)) if n})
        errs.update({f"{p}{n}": lin.added_error for n, lin in zip(("qkv", "o", "gate_up", "down"), layer.linears())
                     if lin.added_error})
        if streamer is not None:
            streamer.store_layer(i, layer)
        layers.append(layer)
    embed_w = get("model.embed_tokens.weight")
    head_w = embed_w if args.tied else get("lm_head.weight")
    if streamer is not None:
        # the head in row slices about one layer's size, so streaming it needs no larger arena
        rows = max(16, 3 * args.ffn_dim // 16 * 16)  # a slice holds about as many weights as one MLP
        parts = []
        for j, r in enumerate(range(0, args.vocab_size, rows)):
            parts.append(_linear(_rows_slice(head_w, r, min(r + rows, args.vocab_size)), kernel))
            streamer.store(("head", j), parts[-1])
        head = StreamedHead(streamer, parts)
        embed = DiskEmbedding(streamer, embed_w)
        del embed_w, head_w
        streamer.place(max_memory)
    else:
        head = _linear(head_w, kernel)
        if head.added_error:
            errs["lm_head"] = head.added_error
        # a quantized table on the kernel (tied: the head itself, held once), its rows read back exactly, in the
        # kernel's compact layout (Q4_K: 4.6 bits per weight where the codes and fp32 scales took 6)
        table = head if args.tied else _linear(embed_w, kernel) if isinstance(embed_w, QuantizedWeight) else None
        if isinstance(table, RuntimeLinear) and table.kind in VNNI_KINDS and table.perm is None \
                and table.bias is None and table.added_error and table.added_error["sqnr_db"] > 100:
            embed = Embedding(table, head)
        else:
            embed = Embedding(embed_w.compact() if isinstance(embed_w, QuantizedWeight)
                              else embed_w.to(torch.bfloat16))
        del embed_w, head_w
    info = dict(info or {})
    info["runtime_added_error"] = errs
    engine = Engine(config, args, embed, layers, gain("model.norm.weight"), head,
                    fam.rope_tables(config, args.max_ctx), kv_format, info)
    engine.streamer = streamer
    return_free_heap()
    return engine


def _moe_block(fam, config, i: int, p: str, get, group):
    from .model import MoEBlock

    moe = fam.moe
    experts = [(group((f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj")), group((f"mlp.experts.{e}.down_proj",)))
               for e in range(moe.n_experts(config))]
    shared = gate = None
    if moe.shared:
        g = fam.shared_groups
        shared, gate = (group(g[0]), group(g[1])), get(p + "mlp.shared_expert_gate.weight").float()
    return MoEBlock(get(p + "mlp.gate.weight").float(), experts, moe.top_k(config), moe.normalize(config),
                    moe.ffn(config), shared, gate, getattr(config, "shared_expert_intermediate_size", 0) or 0, i)


def resident_estimate(kind: str, path: Path) -> int:
    """Bytes the runtime will hold for a source's weights: GGUF tensors in the kernel's layout (4-, 6- or 8-bit
    codes, an fp16 scale and m per 32, or a super-block's own codes), other quantized GGUF types re-quantized to 8
    bits, float ones in bf16; artifacts as stored; everything else in bf16."""
    if kind == "gguf":
        from ..models.gguf_file import open_gguf

        def held(t) -> int:
            n = int(t.n_elements)
            if t.tensor_type in DENSE_GGUF:
                return n * 2
            fmt = GGUF_CODES.get(t.tensor_type, REQUANT)
            code_bits = 4 if fmt.bits <= 4 else 6 if fmt.bits <= 6 else 8
            if fmt.superblock:  # int8 scale (and min) codes per group, fp16 d (and dmin) per 256
                per = 1 if fmt.symmetric else 2
                scale_bits = per * 8 / fmt.group_size + per * 16 / 256
            else:
                scale_bits = 32 / 32
            return int(n * (code_bits + scale_bits) / 8)

        return sum(held(t) for t in open_gguf(path).tensors)
    files = sorted(path.glob("*.safetensors"))
    if kind == "artifact":
        return sum(f.stat().st_size for f in files)
    from ..models.lazy import safetensors_shapes

    return sum(int(np.prod(shape)) * 2 for f in files for shape in safetensors_shapes(f).values())


def load_engine(source: str | os.PathLike, kv_format: str = "bf16", progress: bool = False,
                max_memory: int | None = None, kernel: str = "auto", round_dense: WeightFormat | None = None):
    """(engine, tokenizer, kind, manifest) for an artifact, a GGUF file, a HF folder or a known model name
    (round_dense: see build_engine)."""
    from .kv import kv_format as check_kv

    check_kv(kv_format)
    path, kind = resolve_source(source)
    reader = {"artifact": _artifact_source, "gguf": _gguf_source, "hf": _hf_source}[kind]
    config, tokenizer, get, names, manifest = reader(path)
    ModelArgs.from_config(config)  # refuse an architecture the runtime lacks before any work
    if max_memory is None:
        from ..memory import require

        need = resident_estimate(kind, path)
        require(int(need * 1.1) + (300 << 20), f"running {os.fspath(source)} with every weight resident",
                f"Pass --max-memory SIZE (e.g. --max-memory {max(need // 3, 1 << 28) / 1e9:.1f}GB) to keep that "
                "much resident and stream the other layers from disk each token.")
    engine = build_engine(config, get, names, kv_format, progress,
                          {"source": os.fspath(source), "kind": kind, "path": path}, max_memory, kernel, round_dense)
    if kind == "gguf":  # the engine holds its own copies: the kept metadata (124 MB for Qwen2.5-1.5B) is let go
        from ..models.gguf_file import release_readers

        release_readers()
    requantized = getattr(get, "requantized", None)
    if requantized:
        engine.info["gguf_requantized"] = requantized
        worst = min(requantized.values(), key=lambda e: e["sqnr_db"])
        log.info("%d GGUF tensors of types %s re-quantized to %s for the runtime's kernels (least SQNR %.1f dB "
                 "against the file's weights)", len(requantized), sorted({e["type"] for e in requantized.values()}),
                 REQUANT.name, worst["sqnr_db"])
    return engine, tokenizer, kind, manifest
