"""Export a tightfit artifact to GGUF for llama.cpp / ollama, keeping each tensor's own type.

Tensors whose format equals a GGML block type (fp16 scales, group 32: sym4/asym4/sym5/asym5/sym8 ->
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) are copied code for code. Others are re-quantized from their dequantized values to
the smallest of those types at least as large, and the added error is reported per tensor (an error with
strict=True). Llama's q/k rows are permuted for llama.cpp's rotary layout; rows never cross a group, so the
permutation is exact on codes and scales alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from ..errors import FormatError
from ..formats.ggml import to_ggml
from ..models.arch import to_gguf_tensor
from ..quant.core import QuantizedWeight
from .gguf import TensorEntry, gguf_names, tokenizer_writer, write_gguf

log = logging.getLogger(__name__)

# GGML types gguf-py can quantize, by bits per weight
REQUANT_TYPES = (("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0), ("Q8_0", 8.5))
FILE_TYPES = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def _permuted(qw: QuantizedWeight, name: str, config) -> QuantizedWeight:
    """The same quantized weight with rows in GGUF order."""
    def rows(t):
        return None if t is None else to_gguf_tensor(name, t, config).contiguous()

    return QuantizedWeight(qw.fmt, rows(qw.codes), rows(qw.scales), rows(qw.mins), qw.g_idx)


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
    names = gguf_names(config, list(qweights) + list(kept))
    report, entries, counts = {}, [], {}
    for hf_name, gguf_name in names.items():
        if hf_name in kept:
            t = kept[hf_name].float()
            entries.append(TensorEntry(gguf_name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4,
                                       lambda t=t, n=hf_name: to_gguf_tensor(n, t, config).numpy()))
            report[hf_name] = {"ggml_type": "F32", "exact": True}
            continue
        qw = qweights[hf_name]
        if qw.fmt.ggml_type and qw.g_idx is None:
            ggml, raw = to_ggml(_permuted(qw, hf_name, config))
            report[hf_name] = {"format": qw.fmt.name, "ggml_type": ggml, "exact": True}
        else:
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
            report[hf_name] = {"format": qw.fmt.name, "ggml_type": ggml, "exact": False, "added_rel_mse": added}
        counts[ggml] = counts.get(ggml, 0) + qw.shape[0] * qw.shape[1]
        entries.append(TensorEntry(gguf_name, tuple(raw.shape), np.dtype(np.uint8), raw.nbytes,
                                   lambda raw=raw: raw, gguf.GGMLQuantizationType[ggml]))
    main_type = max(counts, key=counts.get)
    out = write_gguf(Path(out), config, artifact.name, tokenizer_writer(lm), entries, FILE_TYPES[main_type],
                     force, progress)
    return {"output": str(out), "bits_per_weight": gguf_bits_per_weight(out),
            "artifact_bits_per_weight": manifest["bits_per_weight"], "tensors": report,
            "exact": all(r["exact"] for r in report.values())}
