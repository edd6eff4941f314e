"""The engines a plan is realized on, as data: how fast their batch-1 kernels stream weights, what each layer and
token costs besides, how they split a model over devices, and what memory they reserve. The planner prices a
catalog device through its engine (`priced`); a probed machine (`this`) is priced from its own measurements.

Speed constants (stream efficiency, per-layer cost) are fitted by bench/whatif.py --fit on half of the published
batch-1 figures it lists (the other half is held back; bench/README "What-if validation"). Memory figures are
each cited where they are defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import TightfitError
from ..hardware import Device

GIB = 1024 ** 3


class EngineError(TightfitError, ValueError):
    """An unknown engine, or one that cannot run on the device."""


@dataclass(frozen=True)
class Engine:
    name: str
    kinds: tuple[str, ...]  # device kinds it runs on
    split: str  # over several devices: "tensor" (every device works on every layer) or "layer" (in turn)
    stream_dense: float  # fraction of the datasheet bandwidth its batch-1 kernels read 16-bit weights at
    stream_quant: float  # same, for quantized weights (dequantized in the kernel)
    stream_cap: float  # bytes/s its batch-1 kernels reach at most on any device (bytes in flight / latency)
    layer_s: dict  # device kind -> seconds per decoder layer per token besides reading weights (launches, syncs)
    allreduce_s: dict  # "nvlink" / "pcie" -> seconds per all-reduce of one token's hidden state (tensor split)
    hop_s: float = 0.0  # layer split: seconds per device boundary per token (copying the hidden state across)
    moe_layer_s: float = 0.0  # what a routed-expert layer costs besides a dense one (routing, grouped GEMMs)
    kv_formats: tuple[str, ...] = ("bf16",)  # KV-cache formats it runs (tightfit's names)
    formats: tuple[str, ...] = ()  # weight formats it runs as exported (empty: the device kind's defaults)
    source: str = ""


ENGINES = {
    # vLLM (and SGLang: both run batch-1 decode as captured CUDA graphs, W4A16/W8A16/FP8 kernels in 16-bit math)
    "vllm": Engine(
        "vllm", ("gpu", "npu"), "tensor", stream_dense=0.9, stream_quant=0.9, stream_cap=1.422e12,
        layer_s={"gpu": 36.7e-6, "npu": 36.7e-6},
        # an all-reduce of a few kB: custom all-reduce over NVLink ~ 8-10 us; over PCIe without peer access
        # (consumer cards) NCCL through host memory ~ 30-50 us (vLLM's custom_all_reduce is NVLink-only)
        allreduce_s={"nvlink": 10e-6, "pcie": 40e-6}, kv_formats=("bf16", "fp8"), moe_layer_s=454.1e-6,
        # cap and per-layer cost fitted on SGLang's batch-1 H20 figures (QwenLM docs speed_benchmark), the routed
        # layer's cost on DeepSeek-V3 TP8 on H20 (vllm-project/vllm#30832: 30 tok/s; its MLA, FP8 block GEMMs of
        # 9 experts and the all-reduces: most of a token); the 0.9 stream fraction is not fitted (the cap binds on
        # every catalog GPU but the consumer cards); an NPU is priced as a GPU
        source="fitted on SGLang/vLLM batch-1 figures on H20 (bench/whatif.py)"),
    # llama.cpp: quantized dot products over 8-bit-rounded activations; -sm layer (its default) runs each
    # device's layers in turn at batch 1
    "llama.cpp": Engine(
        "llama.cpp", ("gpu", "soc", "cpu"), "layer", stream_dense=0.95, stream_quant=0.95, stream_cap=1.249e12,
        layer_s={"gpu": 93.3e-6, "soc": 180.1e-6, "cpu": 20e-6},
        allreduce_s={"nvlink": 10e-6, "pcie": 40e-6}, hop_s=20e-6, kv_formats=("bf16", "int8", "int4"),
        # the formats the GGUF export copies exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and 16-bit
        formats=("sym4-g32", "asym4-g32", "sym5-g32", "asym5-g32", "sym8-g32", "asym4-k32", "asym5-k32", "sym6-k32",
                 "bf16"),
        # fitted on XiongjieDai/GPU-Benchmarks-on-LLM-Inference (bench/whatif.py; the stream fractions sit at
        # the fit's 0.95 bound: consumer cards stream near their datasheet rate, HBM cards hit the 1.25 TB/s
        # cap); the CPU per-layer figure is not fitted (no published CPU row)
        source="fitted on XiongjieDai's llama.cpp batch-1 figures (bench/whatif.py)"),
    # tightfit's own runtime on CPUs and Apple SoCs (their CPU cores): priced from `tightfit probe` when the
    # device is this machine, else from the roofline defaults
    "tightfit": Engine("tightfit", ("cpu", "soc"), "layer", stream_dense=0.8, stream_quant=0.8, stream_cap=1e15,
                       layer_s={}, allreduce_s={}, source="tightfit probe"),
}
DEFAULT = {"gpu": "vllm", "npu": "vllm", "cpu": "tightfit", "soc": "tightfit"}


def engine_for(device: Device, name: str | None = None) -> Engine:
    name = name or DEFAULT[device.kind]
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    e = ENGINES[name]
    if device.kind not in e.kinds:
        raise EngineError(f"{name} does not run on {device.name} (a {device.kind}); it runs on "
                          f"{', '.join(e.kinds)}")
    return e


def priced(device: Device, engine: Engine) -> Device:
    """`device` with the efficiency figures the cost model reads, from the engine's constants; a probed machine
    keeps its measured figures."""
    if device.key == "this" or engine.name == "tightfit":
        return device
    bw = device.bandwidth
    link = "nvlink" if device.link else "pcie"
    eff = dict(device.efficiency)
    quant = min(engine.stream_quant * bw, engine.stream_cap)
    eff.update({"bandwidth": min(engine.stream_dense, engine.stream_cap / bw), "stream_by_bits": {"4": quant, "8": quant},
                "overhead_layer_s": engine.layer_s.get(device.kind, 0.0), "overhead_s": 0.0,
                "overhead_moe_layer_s": engine.layer_s.get(device.kind, 0.0) + engine.moe_layer_s,
                "overhead_expert_s": 0.0,
                "allreduce_s": engine.allreduce_s.get(link, 0.0), "split": engine.split, "hop_s": engine.hop_s})
    return replace(device, efficiency=eff)


# the flag that selects a KV format on each engine
KV_FLAGS = {"vllm": {"fp8": "--kv-cache-dtype fp8"},
            "llama.cpp": {"int8": "-fa on -ctk q8_0 -ctv q8_0", "int4": "-fa on -ctk q4_0 -ctv q4_0"}}


# --- memory an engine reserves per device ------------------------------------------------------------------------

# vLLM: the instance may use total x --gpu-memory-utilization (default 0.9) for weights, the profiled activation
# peak, non-torch memory and the KV cache; CUDA graphs are captured afterwards, in what is left (vLLM's
# gpu_worker: "Graph capturing finished in N secs, took X GiB", 0.1-1.0 GiB in logs seen). Non-torch memory
# (CUDA context, cuBLAS workspaces, NCCL buffers) was logged as 1.79 GiB on an 80 GB H100 at TP 1 and 3.58 GiB at
# TP 2 (vllm-project/vllm PR #10511), 0.20 GiB per 24 GB card (PR #14447). The activation peak is its profile run
# at max_num_batched_tokens plus the sampler over max_num_seqs (256) rows of logits: 1.26 GiB for
# Llama-3-8B in PR #10511.
VLLM_UTILIZATION = 0.9
VLLM_MAX_UTILIZATION = 0.95  # beyond this, the graph pool and fragmentation have nowhere to go
VLLM_GRAPH_BYTES = 1.0 * GIB
# max_num_batched_tokens: vLLM's `serve` default is 8192 on H100/H200-class cards and 2048 elsewhere (its
# usage-context defaults); the recipe passes it explicitly so the activation peak planned for is the one it gets
def vllm_batched_tokens(device: Device) -> int:
    return 8192 if device.memory >= 70e9 else 2048


VLLM_MAX_SEQS = 256
VLLM_BLOCK = 16  # tokens per KV block


def vllm_non_torch_bytes(device: Device, tp: int) -> float:
    return (0.2 * GIB + 0.02 * device.memory) * (2 if tp > 1 else 1)


def vllm_activation_bytes(spec, batched_tokens: int = 8192, max_seqs: int = VLLM_MAX_SEQS) -> float:
    widest = spec.widest
    # the fused gate/up output (2 x ffn) and its activated product (ffn), the hidden states; fp32 logits twice
    return batched_tokens * (3 * widest + 4 * spec.dim) * 2 + max_seqs * spec.vocab * 4 * 2


def vllm_kv_tokens(context: int, batch: int) -> int:
    return math.ceil(context / VLLM_BLOCK) * VLLM_BLOCK * batch


@dataclass(frozen=True)
class VllmFit:
    """What one device holds under vLLM and the flags that make it start."""
    weights: float  # per device
    kv: float
    activation: float
    non_torch: float
    graph: float
    utilization: float  # the --gpu-memory-utilization needed
    eager: bool  # --enforce-eager (no graph pool) needed
    batched_tokens: int = 8192

    def flags(self) -> list[str]:
        out = [f"--max-num-batched-tokens {self.batched_tokens}"]
        if abs(self.utilization - VLLM_UTILIZATION) > 1e-9:
            out.append(f"--gpu-memory-utilization {self.utilization:.2f}")
        if self.eager:
            out.append("--enforce-eager")
        return out


def vllm_fit(spec, device: Device, tp: int, weights: float, kv: float) -> VllmFit:
    """Per-device memory of a plan under vLLM with `tp` devices (weights and KV split evenly), and the smallest
    --gpu-memory-utilization that starts it: its budget must hold weights, KV, the activation peak and non-torch
    memory, and what it leaves must hold the CUDA graph pool (or the engine runs eagerly)."""
    w, k = weights / tp, kv / tp
    batched_tokens = vllm_batched_tokens(device)
    act, nt = vllm_activation_bytes(spec, batched_tokens), vllm_non_torch_bytes(device, tp)
    need = w + k + act + nt
    util = max(VLLM_UTILIZATION, math.ceil(100 * need / device.memory) / 100)
    # the graph pool does not fit beside the budget: run eagerly
    eager = (1 - util) * device.memory < VLLM_GRAPH_BYTES
    return VllmFit(w, k, act, nt, 0.0 if eager else VLLM_GRAPH_BYTES, util, eager, batched_tokens)


# llama.cpp: per device a backend context (~0.3 GiB for CUDA; a figure commonly seen in nvidia-smi beside a
# llama-server) and a compute buffer for one micro-batch (n_ubatch 512): the logits row per token, the MLP's and
# attention's intermediate tensors; KV in F16 for the context asked for.
LLAMA_CONTEXT_BYTES = {"gpu": 0.3 * GIB, "soc": 0.0, "cpu": 0.0}
LLAMA_UBATCH = 512


def llama_compute_bytes(spec, context: int) -> float:
    widest = spec.widest
    return LLAMA_UBATCH * (spec.vocab + 2 * widest + 4 * spec.dim) * 4 + LLAMA_UBATCH * min(context, 4096) * 4 * 4


def reserve_bytes(spec, device: Device, engine: Engine, devices: int, context: int,
                  max_memory: float | None) -> dict | None:
    """What the engine holds on the devices besides weights and KV cache (totals over the devices):
    {"activations", "runtime"}; None for tightfit's runtime (the planner's own accounting)."""
    if engine.name == "vllm":
        # with --max-memory the budget is the utilization fraction itself; else vLLM's most frugal start leaves
        # (1 - VLLM_MAX_UTILIZATION) of each device outside it
        headroom = 0.0 if max_memory is not None else (1 - VLLM_MAX_UTILIZATION) * device.memory
        return {"activations": vllm_activation_bytes(spec, vllm_batched_tokens(device)) * devices,
                "runtime": (vllm_non_torch_bytes(device, devices) + headroom) * devices}
    if engine.name == "llama.cpp":
        return {"activations": llama_compute_bytes(spec, context) * devices,
                "runtime": LLAMA_CONTEXT_BYTES.get(device.kind, 0.0) * devices}
    return None
