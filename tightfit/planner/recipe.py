"""The existing engine command that realizes a plan, checked against that engine's known constraints."""

from __future__ import annotations

import math

from ..hardware import Device
from .spec import ModelSpec


def tp_problems(spec: ModelSpec, n: int, group_size: int = 128) -> list[str]:
    """Why vLLM's --tensor-parallel-size n cannot split this model (empty when it can)."""
    why = []
    if spec.n_heads % n:
        why.append(f"{spec.n_heads} attention heads are not divisible by {n}")
    kv = spec.n_kv_heads
    if (n > kv and n % kv) or (n <= kv and kv % n):
        why.append(f"{kv} KV heads neither divide nor are divisible by {n}")
    for it in spec.items:
        if it.role in ("o", "down", "expert_down") and (it.shape[1] % n or (it.shape[1] // n) % group_size):
            why.append(f"{it.role} input dim {it.shape[1]} split {n} ways breaks groups of {group_size}")
            break
    return why


def recipe(spec: ModelSpec, device: Device, plan) -> list[str]:
    """The commands that realize `plan`, with the flags that make it start (memory, context, KV format)."""
    from .engines import DEFAULT, KV_FLAGS

    n = plan.devices
    off = [p for p in plan.placement.values() if p != "device"]
    engine = plan.engine or DEFAULT[device.kind]
    kv = KV_FLAGS.get(engine, {}).get(plan.kv_format, "")
    lines = []
    if engine == "vllm":
        flags = " ".join([f"--max-model-len {plan.context}"] + plan.constraints.get("engine_flags", [])
                         + ([kv] if kv else []) + ([f"--max-num-seqs {plan.batch}"] if plan.batch > 1 else []))
        problems = tp_problems(spec, n) if n > 1 else []
        if problems:
            lines.append(f"vLLM cannot use --tensor-parallel-size {n}: " + "; ".join(problems) +
                         f". Use --pipeline-parallel-size {n} instead.")
            lines.append(f"tightfit export ARTIFACT --format compressed-tensors -o DIR && vllm serve DIR "
                         f"--pipeline-parallel-size {n} {flags}")
        else:
            lines.append(f"tightfit export ARTIFACT --format compressed-tensors -o DIR && vllm serve DIR "
                         f"--tensor-parallel-size {n} {flags}"
                         + (f" --cpu-offload-gb {math.ceil(plan.memory_bytes['offloaded_weights'] / 1e9 / n)}"
                            if off else ""))
    elif engine == "llama.cpp":
        on_dev = spec.n_layers - len(off)
        lines.append(f"tightfit export ARTIFACT --format gguf -o model.gguf && llama-server -m model.gguf "
                     f"-ngl {on_dev} -c {plan.context}" + (f" {kv}" if kv else "")
                     + (f" -np {plan.batch}" if plan.batch > 1 else "")
                     + (f" --tensor-split {','.join(['1'] * n)}" if n > 1 else ""))
    else:
        lines.append(f"tightfit quantize MODEL --plan plan.json -o ARTIFACT && tightfit serve ARTIFACT --ctx {plan.context}"
                     + (" --max-memory SIZE" if off else ""))
    return lines
