"""Export a tightfit artifact to GGUF for llama.cpp / ollama, keeping each tensor's own type.

Tensors whose format equals a GGML block type (fp16 scales, group 32: sym4/asym4/sym5/asym5/sym8 ->
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; super-blocks: asym4-k32/asym5-k32/sym6-k32 -> Q4_K/Q5_K/Q6_K; the non-uniform
nl4-g32/nl4-k32 -> IQ4_NL/IQ4_XS) are copied code for code. Others are re-quantized from their dequantized values to
the smallest of those types at least as large, and the added error is reported per tensor (an error with
strict=True). Llama's q/k rows are permuted for llama.cpp's rotary layout; rows never cross a group, so the
permutation is exact on codes and scales alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import FormatError
from ..formats.ggml import to_ggml
from ..models.arch import to_gguf_tensor
from ..models.families import family_of
from ..quant.core import QuantizedWeight
from .gguf import TensorEntry, gguf_names, tokenizer_writer, write_gguf

log = logging.getLogger(__name__)

# GGML types gguf-py can quantize, by bits per weight
REQUANT_TYPES = (("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0), ("Q8_0", 8.5))
FILE_TYPES = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
              "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL, "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS}


def _permuted(qw: QuantizedWeight, name: str, config) -> QuantizedWeight:
    """The same quantized weight with rows in GGUF order."""
    def rows(t):
        return None if t is None else to_gguf_tensor(name, t, config).contiguous()

    return QuantizedWeight(qw.fmt, rows(qw.codes), rows(qw.scales), rows(qw.mins), qw.g_idx)


def _gguf_raw(qw: QuantizedWeight, hf_name: str, config, strict: bool) -> tuple[str, np.ndarray, dict]:
    """(GGML type, raw blocks, report entry) of one quantized tensor: its codes as they are where the format is a
    GGML type, else re-quantized to the nearest larger GGML type with the added error reported."""
    if qw.fmt.ggml_type and qw.g_idx is None:
        ggml, raw = to_ggml(_permuted(qw, hf_name, config))
        return ggml, raw, {"format": qw.fmt.name, "ggml_type": ggml, "exact": True}
    ggml = requant_type(qw)
    w = to_gguf_tensor(hf_name, qw.dequantize(), config).numpy()
    qtype = gguf.GGMLQuantizationType[ggml]
    raw = gguf.quants.quantize(w, qtype)
    back = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    added = float(((back - w) ** 2).sum() / max(float((w ** 2).sum()), 1e-30))
    msg = f"{hf_name}: {qw.fmt.name}{' with g_idx' if qw.g_idx is not None else ''} has no GGML type; " \
          f"re-quantized to {ggml}, adding relative error {added:.3e}"
    if strict:
        raise FormatError(msg + " (strict: export only formats GGUF holds exactly, or drop --strict)")
    log.warning(msg)
    return ggml, raw, {"format": qw.fmt.name, "ggml_type": ggml, "exact": False, "added_rel_mse": added}


def _expert_entries(config, qweights: dict, kept: dict, entries: list, report: dict, counts: dict,
                    strict: bool) -> None:
    """Pop every expert tensor from qweights / kept into 3-D GGUF entries [experts, rows, row bytes] (all experts
    of one projection must share a GGML type: a kept float expert makes the stack F32)."""
    fam = family_of(config)
    moe = fam.moe
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if not moe.is_moe_layer(config, i):
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names = [moe.expert_name(p, e, proj) for e in range(moe.n_experts(config))]
            gname = fam.gguf_expert_name(i, proj)
            if any(n in kept for n in names):
                t = torch.stack([kept.pop(n).float() if n in kept else qweights.pop(n).dequantize() for n in names])
                entries.append(TensorEntry(gname, tuple(t.shape), np.dtype(np.float32), t.numel() * 4,
                                           lambda t=t: t.numpy()))
                report[gname] = {"ggml_type": "F32", "exact": True, "experts": len(names)}
                continue
            qws = [qweights.pop(n) for n in names]
            parts = [_gguf_raw(qw, n, config, strict) for qw, n in zip(qws, names)]
            types = {g for g, _, _ in parts}
            if len(types) > 1:
                raise FormatError(f"{gname}: its experts were quantized to different GGML types {sorted(types)}; "
                                  "GGUF stacks one projection's experts in one tensor of one type.")
            ggml = types.pop()
            raw = np.stack([r for _, r, _ in parts])
            report.update({n: rep for n, (_, _, rep) in zip(names, parts)})
            counts[ggml] = counts.get(ggml, 0) + sum(qw.shape[0] * qw.shape[1] for qw in qws)
            entries.append(TensorEntry(gname, tuple(raw.shape), np.dtype(np.uint8), raw.nbytes,
                                       lambda raw=raw: raw, gguf.GGMLQuantizationType[ggml]))


def requant_type(qw: QuantizedWeight) -> str:
    bpw = qw.fmt.bits_per_weight(qw.shape)
    return next((t for t, b in REQUANT_TYPES if b >= bpw - 1e-9), "Q8_0")


def export_gguf(artifact: str | Path, out: str | Path, *, strict: bool = False, force: bool = False,
                progress: bool = False) -> dict:
    """Write the artifact as a GGUF file; returns a report: per-tensor GGML type, exact or added error, and the
    bits per weight actually exported."""
    from .. import load
    from ..formats.size import gguf_bits_per_weight
    from ..quant.artifact import load_quantized

    artifact = Path(artifact)
    manifest, qweights, kept = load_quantized(artifact)
    lm = load(artifact)  # config and tokenizer (its weights are the reference for the added error)
    config = lm.config
    report, entries, counts = {}, [], {}
    if family_of(config).moe is not None:  # one 3-D GGUF tensor per layer and projection, its experts stacked
        _expert_entries(config, qweights, kept, entries, report, counts, strict)
    names = gguf_names(config, list(qweights) + list(kept))
    for hf_name, gguf_name in names.items():
        if hf_name in kept:
            t = kept[hf_name].float()
            entries.append(TensorEntry(gguf_name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4,
                                       lambda t=t, n=hf_name: to_gguf_tensor(n, t, config).numpy()))
            report[hf_name] = {"ggml_type": "F32", "exact": True}
            continue
        qw = qweights[hf_name]
        ggml, raw, report[hf_name] = _gguf_raw(qw, hf_name, config, strict)
        counts[ggml] = counts.get(ggml, 0) + qw.shape[0] * qw.shape[1]
        entries.append(TensorEntry(gguf_name, tuple(raw.shape), np.dtype(np.uint8), raw.nbytes,
                                   lambda raw=raw: raw, gguf.GGMLQuantizationType[ggml]))
    if config.tie_word_embeddings and family_of(config).gguf_output_required:  # the tied head written twice
        embed = next(e for e in entries if e.name == "token_embd.weight")
        entries.append(TensorEntry("output.weight", embed.shape, embed.dtype, embed.nbytes, embed.make, embed.raw_type))
    main_type = max(counts, key=counts.get)
    out = write_gguf(Path(out), config, artifact.name, tokenizer_writer(lm), entries, FILE_TYPES[main_type],
                     force, progress)
    return {"output": str(out), "bits_per_weight": gguf_bits_per_weight(out),
            "artifact_bits_per_weight": manifest["bits_per_weight"], "tensors": report,
            "exact": all(r["exact"] for r in report.values())}
