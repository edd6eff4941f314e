"""The cost model: pure formulas over a ModelSpec, formats and a Device (hardware figures passed in as data).

Memory: weight bytes per format (the formats' own size function; on CPUs what tightfit's runtime holds: 2-4-bit
codes as 4 bits, 5-8-bit as 8, fp16 scale and min per 32), KV cache per context/batch/KV format, activations.
Decode time per token by roofline: bytes read / effective bandwidth of where they live (device, host over its
link, disk), or FLOPs / effective compute, whichever is larger, plus the fixed per-token overhead a probe
measured; tensor parallelism splits bytes and FLOPs over N devices and adds two all-reduces per layer over the
device link. MoE reads only the experts a step routes to (distinct experts at batch B: E (1 - (1 - k/E)^B)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
from ..formats.kv import KV_FORMATS
from ..formats.weight import WeightFormat
from ..hardware import Device
from .prior import format_rel_mse, prior_loss  # noqa: F401  (the planner's prior, re-exported)
from .spec import Item, ModelSpec

DENSE = "bf16"
ALLREDUCE_LATENCY_S = 10e-6  # order of a small NCCL all-reduce within one node (a modelling constant)
ACT_CHUNK = 512  # prefill tokens per chunk, for the activation estimate

# formats each kind of device runs: GPUs/NPUs as vLLM's int4/int8 kernels take them (symmetric); CPUs as
# tightfit's runtime runs them on its fast path (a bf16 tensor would drop a layer to the slower torch path);
# Apple SoCs as engines there do
FORMATS = {
    "gpu": ("sym4-g128", "sym4-g64", "sym4-g32", "sym8-pc", DENSE),
    "npu": ("sym4-g128", "sym8-pc", DENSE),
    "cpu": ("asym2-g32", "asym3-g32", "sym4-g32", "nl4-g32", "asym4-g32", "asym5-g32", "asym6-g32", "sym8-g32"),
    "soc": ("asym2-g32", "asym3-g32", "sym4-g32", "nl4-g32", "asym4-g32", "asym5-g32", "asym6-g32", "sym8-g32",
            DENSE),
}
KV_CHOICES = ("bf16", "int8", "int4")
# tightfit's runtime decodes fast (one C call per layer) with a float cache only; int8/int4 caches run the slower
# torch path and exist to measure their quality cost, so CPU plans keep bf16
KV_CHOICES_BY_KIND = {"cpu": ("bf16",), "soc": ("bf16",)}


def fits(fmt: str, shape: tuple[int, int]) -> bool:
    if fmt == DENSE:
        return True
    return WeightFormat.parse(fmt).fits(tuple(shape))


def tensor_bytes(fmt: str, shape: tuple[int, int], device: Device) -> int:
    """Bytes one tensor takes where it runs."""
    n, k = shape
    if fmt == DENSE:
        return 2 * n * k
    f = WeightFormat.parse(fmt)
    if device.kind in ("cpu", "soc"):  # tightfit's runtime: 4- or 8-bit codes, fp16 scale + min per 32
        bits = 4 if f.bits <= 4 else 8
        return n * k * bits // 8 + n * (k // 32) * 4
    return f.nbytes(shape)


def item_bytes(item: Item, fmt: str, device: Device, tied: bool = False) -> int:
    """Bytes an item keeps resident. On CPUs a tied embedding is held twice by the runtime: as the head's kernel
    layout and as the stored codes its rows are read from."""
    b = tensor_bytes(fmt, item.shape, device) * item.count
    if item.role == "embed" and tied and device.kind in ("cpu", "soc"):
        b += 2 * item.params if fmt == DENSE else WeightFormat.parse(fmt).nbytes(item.shape)
    return b


def item_read_bytes(item: Item, fmt: str, device: Device, tied: bool, batch: int) -> float:
    """Bytes one decode step reads: all of a layer's tensors, the routed share of experts, the head; of an untied
    embedding only the rows looked up (nothing, to this model's precision)."""
    if item.role == "embed" and not tied:
        return 0.0
    return tensor_bytes(fmt, item.shape, device) * item.count * item.read_fraction(batch)


# KV-cache formats' KLD on the default model (tightfit eval --kv-format, bench/results/kv.json)
# fp8 (vLLM's e4m3 cache, one scale per layer where int8 has one per head vector) is not measured here: priced
# at twice int8's
KV_PRIOR_KLD = {"bf16": 0.0, "int8": 0.002, "fp8": 0.004, "int4": 0.08}


@dataclass(frozen=True)
class Workload:
    context: int = 4096
    batch: int = 1
    devices: int = 1


def kv_bytes(spec: ModelSpec, kv: str, w: Workload) -> float:
    f = KV_FORMATS[kv]
    per_elem = f.bits / 8
    extra = 2 * f.scale_bytes * (spec.n_kv_heads * 2 if f.group == "head" else 0)  # scale + zero per head vector
    per_token_layer = spec.kv_elems_per_token_layer * per_elem + extra
    return per_token_layer * spec.n_layers * w.context * w.batch


# what tightfit's process holds besides weights, KV cache and activations, measured here (transformers 5.24):
# the tokenizer ~2.0 kB per vocabulary entry (SmolLM2's 49,152 entries: 98 MB), and fp32 rope tables
TOKENIZER_BYTES_PER_ENTRY = 2000


def runtime_overhead_bytes(spec: ModelSpec, device: Device) -> float:
    """The runtime's own memory on CPUs/SoCs (tokenizer, rope tables); 0 for GPU engines (their host process
    is not on the device)."""
    if device.kind not in ("cpu", "soc"):
        return 0.0
    return spec.vocab * TOKENIZER_BYTES_PER_ENTRY + 2 * spec.max_ctx * spec.head_dim * 4


def activation_bytes(spec: ModelSpec, w: Workload) -> float:
    """Prefill working set of one chunk: hidden states, q/k/v, the MLP's widest activation, one layer's attention
    scores, and the logits of the last position per sequence (fp32)."""
    widest = spec.widest
    t = min(ACT_CHUNK, w.context) * w.batch
    return 4 * (t * (4 * spec.dim + 2 * widest) + w.batch * spec.n_heads * min(ACT_CHUNK, w.context) * w.context / max(1, w.devices)
                + w.batch * spec.vocab)


def effective(device: Device) -> tuple[float, float]:
    """(bytes/s, FLOP/s) after the device's efficiency factors (measured by `tightfit probe` for `this`)."""
    e = device.efficiency
    flops = max(device.flops.values()) if device.flops else 1e12
    flops = device.flops.get("bf16", flops)
    return device.bandwidth * e.get("bandwidth", 0.8), flops * e.get("compute", 0.5)


def code_width(fmt: str | None) -> str:
    """The probe's key for a format: "4" (the runtime's 4-bit kernels run 2-4-bit codes), else "8"."""
    return "4" if fmt and fmt != DENSE and WeightFormat.parse(fmt).bits <= 4 else "8"


def kernel_rate(device: Device, fmt: str, nbytes: float | None = None, in_layer: bool = False) -> float | None:
    """Bytes/s the probed runtime streams `fmt` codes at. A decoder layer's tensor: the fused engine's rate
    where the probe timed it; else (and for the head, one large matmul), for a tensor of `nbytes`, the lone
    kernel's rate interpolated in log-size between the probed shapes (clamped at the ends); the mean over
    shapes when no size is given."""
    bits = code_width(fmt)
    engine = device.efficiency.get("engine_by_bits", {}).get(bits) if in_layer else None
    if engine:
        return engine
    points = device.efficiency.get("stream_by_shape", {}).get(bits)
    if not points or nbytes is None:
        by_bits = device.efficiency.get("stream_by_bits")
        return by_bits[bits] if by_bits else None
    xs = [math.log(b) for b, _ in points]
    return float(np.interp(math.log(max(nbytes, 1.0)), xs, [r for _, r in points]))


def placement_bandwidth(device: Device, place: str, fmt: str | None = None, cached: bool = False,
                        nbytes: float | None = None, in_layer: bool = False) -> float:
    """Bytes/s at which a decode step gets a weight placed at `place`. On a CPU/SoC a streamed layer is first
    copied into the runtime's arena (from the page cache when `cached` and the probe measured it, else from
    disk), then read by the kernel: the rates add as times. From the page cache, the copy's rate is what the
    probe measured streaming to add to a decode step (`stream_extra`: the copy competes with the kernel's
    threads), where it has it."""
    bw, _ = effective(device)
    if place == "device":
        # a probed machine knows how fast the runtime streams 4- and 8-bit codes (`tightfit probe`)
        rate = kernel_rate(device, fmt, nbytes, in_layer) if fmt and fmt != DENSE else None
        return rate or bw
    if place == "host":
        return device.host_link * device.efficiency.get("bandwidth", 0.8)
    source = device.efficiency.get("page_cache") if cached else None
    source = source or device.disk
    if device.kind in ("cpu", "soc"):
        kernel = placement_bandwidth(device, "device", fmt, nbytes=nbytes, in_layer=in_layer)
        # what streaming from the page cache adds to a step, as the probe timed it through the runtime's engine
        extra = device.efficiency.get("stream_extra", {}).get(code_width(fmt)) if cached else None
        return 1.0 / (1.0 / (extra or source) + 1.0 / kernel)
    return source


def served_from_page_cache(device: Device, most_bytes: float, max_memory: float | None) -> bool:
    """Whether streamed weights stay in the page cache: a process budget (--max-memory) on a machine whose free
    RAM (as probed) holds the whole model besides it - the kernel keeps the scratch file cached."""
    return (device.kind in ("cpu", "soc") and max_memory is not None and "page_cache" in device.efficiency
            and most_bytes <= device.memory - max_memory)


def parallel(device: Device, w: Workload) -> int:
    """Devices working on one layer at once: all of them under a tensor split, one under a layer split (each runs
    its layers in turn, as llama.cpp's default -sm layer does at batch 1)."""
    return w.devices if device.efficiency.get("split", "tensor") == "tensor" else 1


def fixed_decode_seconds(spec: ModelSpec, device: Device, w: Workload) -> float:
    """Per-token time that no format choice changes: compute floor, all-reduces (tensor split) or hops between
    devices (layer split), the engine's or the probe's per-layer and per-token overhead."""
    _, flops = effective(device)
    n = parallel(device, w)
    compute = 2 * spec.active_params * w.batch / (flops * n)
    comm = 0.0
    if w.devices > 1 and n > 1:
        link = device.link or device.host_link
        per = device.efficiency.get("allreduce_s", ALLREDUCE_LATENCY_S) + \
            2 * (w.devices - 1) / w.devices * w.batch * spec.dim * 2 / link
        comm = 2 * spec.n_layers * per
    elif w.devices > 1:
        link = device.link or device.host_link
        comm = (w.devices - 1) * (device.efficiency.get("hop_s", 0.0) + w.batch * spec.dim * 2 / link)
    e = device.efficiency
    moe = moe_layers(spec)  # an MoE layer's step costs per layer and per routed expert (probe.fixed_costs)
    overhead = e.get("overhead_layer_s", 0.0) * (spec.n_layers - len(moe)) + sum(
        e.get("overhead_moe_layer_s", e.get("overhead_layer_s", 0.0)) + e.get("overhead_expert_s", 0.0) * k
        for k in moe.values())
    return compute + comm + e.get("overhead_s", 0.0) + overhead


def moe_layers(spec: ModelSpec) -> dict[int, float]:
    """Layer -> experts each token is routed to, for the layers with routed experts."""
    return {it.layer: it.active for it in spec.items if it.experts and it.layer is not None}


def prefill_tok_s(spec: ModelSpec, device: Device, w: Workload, weight_bytes: float) -> float:
    bw, flops = effective(device)
    n = parallel(device, w)
    t = min(ACT_CHUNK, w.context) * w.batch
    seconds = max(2 * spec.active_params * t / (flops * n), weight_bytes / (bw * n))
    seconds += fixed_decode_seconds(spec, device, Workload(w.context, 1, w.devices)) - \
        2 * spec.active_params / (flops * n)
    return t / seconds
