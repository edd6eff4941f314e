"""The optimizer: one format per tensor item, one KV format, one placement per layer, chosen together to minimize
predicted quality loss under memory and decode-speed limits - an exact MILP (scipy.optimize.milp, HiGHS).

Variables: w[i, f, p] (item i in format f at placement p), z[l, p] (layer l's placement: every item of a layer
shares it), y[k] (KV format). Memory and time are linear in them, so the problem is solved exactly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from ..errors import TightfitError
from ..hardware import Device
from .cost import (
    DENSE,
    FORMATS,
    KV_CHOICES,
    KV_CHOICES_BY_KIND,
    KV_PRIOR_KLD,
    Workload,
    activation_bytes,
    fits,
    fixed_decode_seconds,
    item_bytes,
    item_read_bytes,
    kv_bytes,
    parallel,
    placement_bandwidth,
    prefill_tok_s,
    prior_loss,
    runtime_overhead_bytes,
    served_from_page_cache,
    tensor_bytes,
)
from .engines import VLLM_MAX_UTILIZATION, engine_for, priced, reserve_bytes, vllm_fit
from .prior import ENGINE_FLOOR
from .recipe import tp_problems
from .spec import ModelSpec

RESERVE = 0.05  # of device memory kept free for the engine's own allocations
FUSED = (("q", "k", "v"), ("gate", "up"), ("expert_gate", "expert_up"))
GB_UNIT = 1e-9  # memory rows of the MILP are in GB
HOST_PER_DEVICE = 2
SECONDS_KLD = 10.0  # with no speed target but offloading forced: 0.1 s per token is worth 1 nat of KLD


def size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class PlanError(TightfitError, ValueError):
    """No plan meets the request; the message says what is missing and the nearest feasible plan."""


@dataclass
class Plan:
    model: str
    hardware: str
    devices: int
    context: int
    batch: int
    kv_format: str
    tensors: dict[str, str]
    placement: dict[str, str]
    memory_bytes: dict[str, float]
    predicted: dict[str, float]
    sensitivity: str  # "measured" or "prior"
    constraints: dict = field(default_factory=dict)
    recipe: list[str] = field(default_factory=list)
    embedding_rows: str = "device"  # "disk": rows looked up in the runtime's scratch file (CPU streaming mode)
    engine: str = ""  # what realizes it: vllm, llama.cpp, tightfit

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def streams(self) -> bool:
        """Whether the runtime realizes this plan in its streaming mode (a budget, some weights on disk)."""
        return self.embedding_rows != "device" or any(p != "device" for p in self.placement.values())


def placements(device: Device, engine: str | None = None) -> tuple[str, ...]:
    # a CPU or an Apple SoC has one memory: its "device" is the host; vLLM offloads to host memory only
    if device.kind in ("cpu", "soc"):
        return ("device", "disk")
    return ("device", "host") if engine == "vllm" else ("device", "host", "disk")


def embedding_places(item, device: Device, places: tuple[str, ...]) -> tuple[str, ...]:
    """Where an embedding/head item may go: on a CPU/SoC whose plan streams, the embedding's rows may stay on
    disk (the runtime's streaming mode reads a looked-up row from its scratch file); elsewhere, the device."""
    if item.role == "embed" and device.kind in ("cpu", "soc") and "disk" in places:
        return ("device", "disk")
    return ("device",)


def item_cost(spec: ModelSpec, device: Device, w: Workload, it, fmt: str, place: str,
              cached: bool) -> tuple[float, float, str]:
    """(bytes held, seconds per decode step, where its bytes are held) of one item in `fmt` at `place`."""
    b = item_bytes(it, fmt, device, spec.tied)
    where = place
    if it.layer is None and place == "disk":
        # the runtime's streaming mode looks embedding rows up in its scratch file; what stays is a tied head's
        # kernel layout, read from memory every token
        b = tensor_bytes(fmt, it.shape, device) if spec.tied else 0
        where = "device"
    bw = placement_bandwidth(device, where, fmt, cached, b, in_layer=it.layer is not None) * (
        parallel(device, w) if where == "device" else 1)
    return b, item_read_bytes(it, fmt, device, spec.tied, w.batch) / bw, where


def decode_seconds(spec: ModelSpec, device: Device, w: Workload, plan: Plan) -> float:
    """Seconds per decode step of a plan fixed beforehand, priced on `device` as solve() prices its choices:
    e.g. an artifact built from a plan, re-predicted from a fresh probe of a machine whose speed drifts."""
    cached = plan.constraints.get("streamed_from") == "page cache"
    device = priced(device, engine_for(device, plan.engine or None))
    total = kv_bytes(spec, plan.kv_format, w) / (placement_bandwidth(device, "device") * parallel(device, w))
    for it in spec.items:
        fmt = plan.tensors.get(it.name)
        if fmt is None:
            raise PlanError(f"the plan has no format for {it.name}: it was made for another model")
        place = plan.placement[str(it.layer)] if it.layer is not None else (
            plan.embedding_rows if it.role == "embed" else "device")
        total += item_cost(spec, device, w, it, fmt, place, cached)[1]
    return total + fixed_decode_seconds(spec, device, w)


def solve(spec: ModelSpec, device: Device, w: Workload, *, min_tok_s: float | None = None,
          max_memory: float | None = None, losses: dict[str, dict[str, float]] | None = None,
          formats: tuple[str, ...] | None = None, kv_choices: tuple[str, ...] | None = None,
          objective: str = "quality", places: tuple[str, ...] | None = None, engine: str | None = None) -> Plan:
    """The plan minimizing predicted KLD (objective="quality") or decode time (objective="speed"), as `engine`
    (default: vLLM on GPUs/NPUs, tightfit's runtime on CPUs/SoCs) runs it.

    Without a speed target, layers stay on the device when they can (nothing else would price a disk read);
    only when they cannot, offloading is allowed and each second per token weighs SECONDS_KLD nats of KLD."""
    eng = engine_for(device, engine)
    device = priced(device, eng)
    if eng.name == "vllm" and w.devices > 1 and tp_problems(spec, w.devices):
        # the recipe falls back to pipeline parallelism, whose stages run in turn at batch 1
        device = replace(device, efficiency={**device.efficiency, "split": "layer"})
    formats = formats or eng.formats or FORMATS[device.kind]
    if kv_choices is None:
        kv_choices = KV_CHOICES_BY_KIND.get(device.kind, KV_CHOICES) if eng.name == "tightfit" else eng.kv_formats
    if places is None and min_tok_s is None and objective == "quality":
        try:
            return solve(spec, device, w, max_memory=max_memory, losses=losses, formats=formats,
                         kv_choices=kv_choices, places=("device",), engine=eng.name)
        except PlanError:
            objective = "balanced"
    places = places or placements(device, eng.name)
    items = spec.items
    cap = max_memory if max_memory is not None else device.memory * w.devices
    budget_util = None
    if eng.name == "vllm" and max_memory is not None:
        # vLLM takes the budget as a whole-percent --gpu-memory-utilization: plan within the one it will get
        budget_util = math.floor(100 * max_memory / (device.memory * w.devices)) / 100
        cap = budget_util * device.memory * w.devices
    held = reserve_bytes(spec, device, eng, w.devices, w.context, max_memory)
    if held is None:  # tightfit's runtime: its activations and own memory, and a margin
        cap *= 1 - RESERVE
        act = activation_bytes(spec, w) + runtime_overhead_bytes(spec, device)
    else:
        act = held["activations"] + held["runtime"]
        if eng.name != "vllm":  # vLLM's headroom is in its reserve; others keep the planner's margin
            cap *= 1 - RESERVE
    # host RAM beside GPUs, where the device states none: twice the devices' memory (a modelling assumption)
    host_cap = device.host_memory or (0 if device.kind in ("cpu", "soc") else HOST_PER_DEVICE * device.memory * w.devices)
    most = sum(max((item_bytes(it, f, device, spec.tied) for f in formats if fits(f, it.shape)), default=0)
               for it in items)
    cached = served_from_page_cache(device, most, max_memory)

    # index the variables
    var, cost, nbytes, seconds, kinds = [], [], [], [], []
    for i, it in enumerate(items):
        for f in formats:
            if not fits(f, it.shape):
                continue
            loss = (losses or {}).get(it.name, {}).get(f) if losses else None
            if loss is None:
                loss = 0.0 if f == DENSE else prior_loss(spec, it, f)
            for p in places if it.layer is not None else embedding_places(it, device, places):
                b, s, where = item_cost(spec, device, w, it, f, p, cached)
                var.append(("w", i, f, p))
                cost.append(loss)
                nbytes.append(b)
                seconds.append(s)
                kinds.append(where)
    n_w = len(var)
    for layer in range(spec.n_layers):
        for p in places:
            var.append(("z", layer, p))
            cost.append(0.0)
            nbytes.append(0)
            seconds.append(0.0)
            kinds.append(None)
    bw_dev = placement_bandwidth(device, "device") * parallel(device, w)
    for k in kv_choices:
        b = kv_bytes(spec, k, w)
        var.append(("y", k))
        cost.append(KV_PRIOR_KLD.get(k, 0.0))
        nbytes.append(b)
        seconds.append(b / bw_dev)  # a decode step reads the whole cache (at full context: conservative)
        kinds.append("device")
    # the arena streamed layers are read into: as large as the largest layer kept off the device
    var.append(("a",))  # in GB (every memory row is in GB: HiGHS's presolve mis-solves rows of 1e10-scale bytes)
    cost.append(0.0)
    nbytes.append(1 / GB_UNIT)
    seconds.append(0.0)
    kinds.append("device")
    n = len(var)
    cost, nbytes, seconds = np.array(cost), np.array(nbytes, dtype=float), np.array(seconds)
    index = {v: j for j, v in enumerate(var)}

    lo, hi = [], []
    A = lil_matrix((len(items) + spec.n_layers * (1 + len(places)) * 8 + 8 + 2 * spec.n_layers, n))
    r = 0
    by_item: dict[int, list[int]] = {}
    for j, v in enumerate(var[:n_w]):
        by_item.setdefault(v[1], []).append(j)
    for i, it in enumerate(items):  # one (format, placement) per item
        if it.layer is None:
            for j in by_item[i]:
                A[r, j] = 1
            lo.append(1)
            hi.append(1)
            r += 1
    for layer in range(spec.n_layers):
        for j in (index[("z", layer, p)] for p in places):
            A[r, j] = 1
        lo.append(1)
        hi.append(1)
        r += 1
        for i, it in enumerate(items):
            if it.layer != layer:
                continue
            for p in places:  # the item sits where its layer sits
                for j in by_item[i]:
                    if var[j][3] == p:
                        A[r, j] = 1
                A[r, index[("z", layer, p)]] = -1
                lo.append(0)
                hi.append(0)
                r += 1
    # engines fuse q/k/v and gate/up into one matmul (tightfit's runtime, vLLM's QKV/MergedColumn layers), which
    # holds one format: members of a fused group take the same format
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        fuse = next((g for g in FUSED if it.role in g), None)
        if fuse is not None and it.layer is not None:
            groups.setdefault((it.layer, fuse), []).append(i)
    extra = []
    for members in groups.values():
        lead = members[0]
        for other in members[1:]:
            for f in formats:
                row = {j: 1.0 for j in by_item[lead] if var[j][2] == f}
                for j in by_item[other]:
                    if var[j][2] == f:
                        row[j] = row.get(j, 0.0) - 1.0
                if row:
                    extra.append(row)
    if extra:
        A.resize((A.shape[0] + len(extra), n))
    for row in extra:
        for j, v in row.items():
            A[r, j] = v
        lo.append(0)
        hi.append(0)
        r += 1
    for k in kv_choices:
        A[r, index[("y", k)]] = 1
    lo.append(1)
    hi.append(1)
    r += 1
    arena = index[("a",)]
    for layer in range(spec.n_layers):
        for p in places:
            if p == "device":
                continue
            for j in range(n_w):
                if var[j][3] == p and items[var[j][1]].layer == layer:
                    A[r, j] = nbytes[j] * GB_UNIT
            A[r, arena] = -1
            lo.append(-np.inf)
            hi.append(0)
            r += 1
    # device memory
    for j in range(n):
        if kinds[j] == "device":
            A[r, j] = nbytes[j] * GB_UNIT
    lo.append(0)
    hi.append((cap - act) * GB_UNIT)
    r += 1
    if "host" in places:
        for j in range(n_w):
            if kinds[j] == "host":
                A[r, j] = nbytes[j] * GB_UNIT
        lo.append(0)
        hi.append(host_cap * GB_UNIT)
        r += 1
    fixed = fixed_decode_seconds(spec, device, w)
    for j in range(n):
        A[r, j] = seconds[j]
    lo.append(0)
    hi.append(np.inf if not min_tok_s else 1 / min_tok_s - fixed)
    r += 1
    A = A[:r].tocsr()

    if objective == "speed":
        c = seconds + 1e-9 * cost
    elif objective == "balanced":
        c = cost + SECONDS_KLD * seconds
    else:
        c = cost + 1e-6 * seconds * max(1.0, float(np.abs(cost).max(initial=0)))  # ties: the faster plan
    integrality = np.ones(n)
    integrality[arena] = 0
    upper = np.ones(n)
    upper[arena] = np.inf
    res = milp(c, constraints=[LinearConstraint(A, lo, hi)], integrality=integrality, bounds=Bounds(0, upper),
               options={"disp": False, "time_limit": 60})
    if res.x is None:
        if places == ("device",):
            raise PlanError("nothing fits on the device alone")
        raise _infeasible(spec, device, w, min_tok_s, max_memory, cap, act, losses, formats, kv_choices, objective,
                          eng, held)
    arena_bytes = float(res.x[arena]) / GB_UNIT
    x = np.round(res.x).astype(bool)
    x[arena] = False
    tensors, placement, kv, embedding_rows = {}, {}, None, "device"
    for j, v in enumerate(var):
        if not x[j]:
            continue
        if v[0] == "w":
            tensors[items[v[1]].name] = v[2]
            if items[v[1]].layer is None and v[3] != "device":
                embedding_rows = v[3]
        elif v[0] == "z":
            placement[str(v[1])] = v[2]
        else:
            kv = v[1]
    weights = float(sum(nbytes[j] for j in range(n_w) if x[j] and kinds[j] == "device"))
    overhead = runtime_overhead_bytes(spec, device)
    offloaded = float(sum(nbytes[j] for j in range(n_w) if x[j] and kinds[j] != "device"))
    kvb = kv_bytes(spec, kv, w)
    decode_s = float(seconds[x].sum()) + fixed
    activations, runtime = (act - overhead, overhead) if held is None else (held["activations"], held["runtime"])
    constraints = {"min_tok_s": min_tok_s, "max_memory": max_memory,
                   "streamed_from": ("page cache" if cached else "disk") if offloaded else None}
    if eng.name == "vllm":
        start = vllm_fit(spec, device, w.devices, weights + arena_bytes, kvb)
        if budget_util is not None:  # the budget the user gave is the utilization
            start = replace(start, utilization=budget_util)
        constraints["engine_flags"] = start.flags()
        constraints["per_device"] = {"weights": start.weights, "kv_cache": start.kv, "activations": start.activation,
                                     "non_torch": start.non_torch, "graph_pool": start.graph,
                                     "gpu_memory_utilization": start.utilization}
    plan = Plan(model=spec.name, hardware=device.key, devices=w.devices, context=w.context, batch=w.batch,
                kv_format=kv, tensors=tensors, placement=placement, embedding_rows=embedding_rows, engine=eng.name,
                memory_bytes={"weights": weights + arena_bytes, "stream_arena": arena_bytes, "kv_cache": kvb,
                              "activations": activations, "runtime": runtime,
                              "total": weights + arena_bytes + kvb + act,
                              "offloaded_weights": offloaded,
                              "capacity": cap if eng.name == "vllm" else cap / (1 - RESERVE)},
                predicted={"decode_tok_s": w.batch / decode_s, "decode_s_per_step": decode_s,
                           "prefill_tok_s": prefill_tok_s(spec, device, w, weights),
                           "kld": float(cost[x].sum()) + ENGINE_FLOOR.get(eng.name, 0.0)},
                sensitivity="measured" if losses else "prior", constraints=constraints)
    return plan


def _infeasible(spec, device, w, min_tok_s, max_memory, cap, act, losses, formats, kv_choices, objective,
                eng, held) -> PlanError:
    """What is missing, and the nearest feasible plan."""
    smallest = sum(min(item_bytes(it, f, device, spec.tied) for f in formats if fits(f, it.shape))
                   for it in spec.items if it.layer is None)
    kv_min = min(kv_bytes(spec, k, w) for k in kv_choices)
    if eng.name == "vllm" and not min_tok_s:
        n = w.devices
        every = sum(min(item_bytes(it, f, device, spec.tied) for f in formats if fits(f, it.shape))
                    for it in spec.items)
        host = device.host_memory or HOST_PER_DEVICE * device.memory * n
        return PlanError(
            f"{spec.name} cannot start in vLLM on {device.name} x{n} at context {w.context}, batch {w.batch}: "
            f"even at its most frugal (--gpu-memory-utilization {VLLM_MAX_UTILIZATION:.2f}"
            f"{', --kv-cache-dtype fp8' if 'fp8' in kv_choices else ''}) each device holds "
            f"{size(held['activations'] / n)} of activation peak and {size(held['runtime'] / n)} of CUDA context, "
            f"workspaces and headroom, leaving {size((cap - act) / n)} per device; in the smallest formats the "
            f"weights are {size(every)} ({size(smallest)} of them embedding/head, which stay on the devices) and "
            f"the KV cache {size(kv_min)}, with at most {size(host)} of layers in host memory "
            "(--cpu-offload-gb). Add devices, shorten the context, or lower the batch.")
    if smallest + kv_min + act > cap:
        return PlanError(
            f"{spec.name} cannot fit {device.name} x{w.devices} at context {w.context}, batch {w.batch}: even with "
            f"the smallest formats and every layer off the device, the embedding/head, KV cache, activations and "
            f"the runtime's own memory ({size(runtime_overhead_bytes(spec, device))}: tokenizer, tables) need "
            f"{size(smallest + kv_min + act)} of {size(cap)} usable. Shorten the context, lower the batch, or add "
            "devices.")
    if min_tok_s:
        best = solve(spec, device, w, max_memory=max_memory, losses=losses, formats=formats,
                     kv_choices=kv_choices, objective="speed", engine=eng.name)
        where = {p: sum(1 for v in best.placement.values() if v == p) for p in ("host", "disk")}
        off = ", ".join(f"{n} layers on {p}" for p, n in where.items() if n)
        return PlanError(
            f"{spec.name} on {device.name} x{w.devices} cannot reach {min_tok_s:g} tok/s: the fastest plan that "
            f"fits gives {best.predicted['decode_tok_s']:.2f} tok/s (KV {best.kv_format}"
            f"{', ' + off if off else ''}; {size(best.memory_bytes['total'])} on the device). Lower "
            "--min-tok-s, add devices, or shorten the context.")
    return PlanError(f"no plan fits {spec.name} on {device.name}; nothing smaller is available")
