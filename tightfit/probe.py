"""`tightfit probe`: measure this machine and save a profile (data) that `--hardware this` reads.

Measures memory read bandwidth, matmul throughput (bf16, or fp32 where the CPU lacks bf16), the runtime's
low-bit kernel throughput per format and shape (weights streamed from memory, as a decode step reads them), the
runtime's fixed cost per decoder layer and per token (a fused decode step on tiny shapes: dispatch, not
arithmetic), disk read bandwidth, the rate at which streamed layers come back from the page cache, and free
memory; and which form of the kernel ran (a profile measured under another is stale). Sits above the runtime
(it times it); hardware/ only reads the profile it writes.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

from .hardware import profile_path
from .io import atomic_path


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _times(fn, reps: int) -> list[float]:
    fn()  # warm up
    return [_once(fn) for _ in range(reps)]


def _best(fn, reps: int = 5) -> float:
    """Fastest seconds of fn: a hardware peak (memory read, matmul)."""
    return min(_times(fn, reps))


def _typical(fn, reps: int = 5) -> float:
    """Median seconds of fn: what the runtime's own timings are predicted against (decode speed is reported as
    a median), where the minimum would price this host's best seconds, not its usual ones."""
    return statistics.median(_times(fn, reps))


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    x = torch.ones(nbytes // 4)
    return nbytes / _best(lambda: x.sum())


def matmul_flops(n: int = 2048) -> float:
    """FLOP/s of a square GEMM in the dtype tightfit computes in here (bf16 where the CPU has it in hardware,
    else fp32: an AVX2-only CPU's bf16 GEMM is emulated, 4-100x slower)."""
    from .runtime.kernels import compute_dtype

    dt = compute_dtype()
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    return 2 * n ** 3 / _best(lambda: a @ b, 3)


STREAM_BYTES = 256e6  # weights cycled per kernel measurement: more than any L3 (a shared L3 can exceed 100 MB)


def kernel_throughput(progress: bool = False) -> dict:
    """Bytes/s the runtime's linear layers stream at batch 1 (weights cycling through more than the caches hold),
    net of the Python/ctypes dispatch of a lone call: a decode step runs each layer's linears in one fused call,
    whose dispatch `fixed_costs` measures separately."""
    from .formats.weight import WeightFormat
    from .quant.core import rtn
    from .runtime.linear import from_quantized

    def per_call(lins, x):
        def run():
            for lin in lins:
                lin(x)
        return _typical(run, 5) / len(lins)

    out = {}
    for fmt in ("sym4-g32", "sym8-g32"):
        f = WeightFormat.parse(fmt)
        tiny = [from_quantized(rtn(torch.randn(32, 64) * 0.02, f), check=False) for _ in range(64)]
        dispatch = per_call(tiny, torch.randn(1, 64))  # arithmetic and traffic negligible: the call itself
        for n, k in ((576, 576), (576, 1536), (3072, 576), (4096, 4096)):  # o, down, gate+up; a large one
            copies = max(2, int(STREAM_BYTES // (n * k * f.bits / 8)))  # far beyond L3: each call reads DRAM
            lin = from_quantized(rtn(torch.randn(n, k) * 0.02, f), check=False)
            lins = [lin] + [copy.deepcopy(lin) for _ in range(copies - 1)]
            s = per_call(lins, torch.randn(1, k))
            net = max(s - dispatch, 0.5 * s)
            out[f"{fmt} {n}x{k}"] = {"bytes_per_s": lins[0].nbytes / net, "seconds_per_call": s,
                                     "dispatch_s": dispatch, "bytes": lins[0].nbytes, "kind": lins[0].kind}
    return out


def _synthetic_engine(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, bits: int,
                      max_memory: int | None = None):
    """A runtime engine over random RTN weights (vocab 256, tied head): what the probe times."""
    from transformers import LlamaConfig

    from .formats.weight import WeightFormat
    from .quant.core import rtn
    from .runtime.load import build_engine

    hd = hidden // heads
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
                      max_position_embeddings=256, tie_word_embeddings=True)
    shapes = {"self_attn.q": (hidden, hidden), "self_attn.k": (kv_heads * hd, hidden),
              "self_attn.v": (kv_heads * hd, hidden), "self_attn.o": (hidden, hidden), "mlp.gate": (ffn, hidden),
              "mlp.up": (ffn, hidden), "mlp.down": (hidden, ffn)}
    fmt = WeightFormat(bits, 32, True)

    def get(name: str):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            return torch.ones(hidden)
        if name == "model.embed_tokens.weight":
            return rtn(torch.randn(256, hidden, generator=g), WeightFormat(8, 32, True))
        return rtn(torch.randn(*shapes[name.split(".", 3)[3].removesuffix("_proj.weight")], generator=g) * 0.05, fmt)

    names = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}" for i in range(layers)
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] + [f"{k}_proj.weight" for k in shapes]}
    layer_bytes = sum(fmt.nbytes(sh) for sh in shapes.values())
    return build_engine(cfg, get, names, max_memory=max_memory), layer_bytes


def _steps_fn(e, steps: int):
    cache = e.new_cache(1, steps + 2)
    tok = torch.tensor([[3]])

    def run():
        for pos in range(steps):
            e.forward(tok, pos, cache)
    return run


def _step_seconds(e, steps: int) -> float:
    """Median seconds of one single-token decode step of engine e."""
    return _typical(_steps_fn(e, steps), 5) / steps


def _paired_extra(a, b, steps: int, reps: int = 7) -> float:
    """Median over interleaved pairs of (seconds per step of b) - (of a): each pair runs under the same load, so
    a busy host shifts both of its timings instead of the difference (two separate medians were seen 15x off)."""
    fa, fb = _steps_fn(a, steps), _steps_fn(b, steps)
    fa(), fb()  # warm up
    diffs = []
    for _ in range(reps):
        ta = _once(fa)
        diffs.append((_once(fb) - ta) / steps)
    return statistics.median(diffs)


# what a profile's numbers describe: 2 = the MoE decode step on the fused C path (per-layer and per-expert costs)
PROBE_VERSION = 2


def _synthetic_moe_engine(layers: int, top_k: int, experts: int = 8, hidden: int = 64, ffn: int = 64):
    """A runtime engine whose every layer is an MoE block (Qwen3-MoE layout) over random RTN weights."""
    from transformers import Qwen3MoeConfig

    from .formats.weight import WeightFormat
    from .quant.core import rtn
    from .runtime.load import build_engine

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn, moe_intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=256,
                         tie_word_embeddings=True)
    fmt = WeightFormat(4, 32, True)
    shapes = {"q_proj": (64, hidden), "k_proj": (32, hidden), "v_proj": (32, hidden), "o_proj": (hidden, 64),
              "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn), "gate": (experts, hidden)}

    def get(name: str):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            return torch.ones(16 if "_norm" in name.rsplit(".", 2)[-2] and "layernorm" not in name else hidden)
        if name == "model.embed_tokens.weight":
            return rtn(torch.randn(256, hidden, generator=g), WeightFormat(8, 32, True))
        w = torch.randn(*shapes[name.rsplit(".", 2)[-2]], generator=g)
        return w if name.endswith("mlp.gate.weight") else rtn(w * 0.05, fmt)

    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                                  "self_attn.k_norm.weight", "mlp.gate.weight")}
        names |= {f"{p}self_attn.{k}.weight" for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {f"{p}mlp.experts.{e}.{k}.weight" for e in range(experts) for k in ("gate_proj", "up_proj", "down_proj")}
    return build_engine(cfg, get, names)


def fixed_costs() -> dict:
    """Per-layer and per-token seconds of a decode step whose arithmetic is negligible (hidden 64); for MoE
    layers, seconds per layer and per routed expert, from 4 layers at top-1 and top-4."""
    t1, t9 = (_step_seconds(_synthetic_engine(n, 64, 128, 4, 2, 4)[0], 100) for n in (1, 9))
    per_layer = max((t9 - t1) / 8, 0.0)
    m1, m4 = (_step_seconds(_synthetic_moe_engine(4, k), 40) for k in (1, 4))
    per_expert = max((m4 - m1) / 3 / 4, 0.0)
    per_moe_layer = max((m1 - max(t1 - per_layer, 0.0)) / 4 - per_expert, 0.0)
    return {"per_layer_s": per_layer, "per_token_s": max(t1 - per_layer, 0.0), "per_moe_layer_s": per_moe_layer,
            "per_expert_s": per_expert}


def disk_bandwidth(nbytes: int = 256 << 20) -> float:
    with tempfile.NamedTemporaryFile(dir=profile_path().parent if profile_path().parent.exists() else None) as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not the page cache
        t = time.perf_counter()
        with open(f.name, "rb", buffering=0) as r:
            while r.read(8 << 20):
                pass
        return nbytes / (time.perf_counter() - t)


def page_cache_bandwidth(units: int = 24, rows: int = 4096, cols: int = 1024) -> float:
    """Bytes/s at which the runtime's Streamer re-reads layer-sized units from its scratch file while the file
    sits in the page cache - how streamed layers are served when the model fits in free RAM but not in the
    --max-memory budget. Units: 8-bit codes of a [rows, cols] weight (~4.5 MB each), all streamed."""
    from .formats.weight import WeightFormat
    from .quant.core import rtn
    from .runtime.linear import from_quantized
    from .runtime.stream import Streamer, unit_bytes

    s = Streamer(directory=str(profile_path().parent) if profile_path().parent.exists() else None)
    try:
        template = from_quantized(rtn(torch.randn(rows, cols), WeightFormat(8, 32, True)), None, kernel="torch")
        for k in range(units):
            s.store(k, copy.copy(template))  # store() empties the copy's slots; the template keeps its tensors
        s.place(unit_bytes(template))  # room for the arena only: every unit streams

        def run():
            for k in range(units):
                s.fetch(k)
        return s.bytes_per_token / _best(run, 5)
    finally:
        s.close()


def engine_rates(fixed: dict, layers: int = 16, hidden: int = 576, ffn: int = 1536, steps: int = 24) -> dict:
    """Bytes/s of a decode step through the runtime's fused engine, per code width ("4", "8"), on synthetic
    layer-sized units (by default the default model's layer shape): "resident", every layer in memory, net of
    the fixed per-token and per-layer costs in `fixed` (the per-call rates of kernel_throughput miss how the
    fused path overlaps small matmuls); "stream_extra", what streaming every layer from the page cache through
    the runtime's Streamer adds, over the bytes streamed: a copy-alone timing misses that the copy competes
    with the kernel's threads and that the kernel then reads a just-copied layer from the CPU's caches."""
    out = {"resident": {}, "stream_extra": {}}
    for bits in (8, 4):
        shape = (layers, hidden, ffn, hidden // 64, max(1, hidden // 192), bits)
        e, layer = _synthetic_engine(*shape)
        resident = _step_seconds(e, steps)
        net = resident - fixed["per_token_s"] - layers * fixed["per_layer_s"]
        out["resident"][str(bits)] = e.weight_bytes()["layers"] / max(net, 0.25 * resident)
        # room for the arena (the runtime's layout is a few % over the codes' bytes) and no second layer: all stream
        s, _ = _synthetic_engine(*shape, max_memory=int(1.3 * layer) + (64 << 10))
        try:
            extra = max(_paired_extra(e, s, steps), 1e-9)
            out["stream_extra"][str(bits)] = s.streamer.bytes_per_token / extra
        finally:
            s.streamer.close()
    return out


def free_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def probe(threads: int | None = None, progress: bool = False) -> dict:
    torch.set_num_threads(threads or torch.get_num_threads())
    steps = {}

    def step(name, fn):
        if progress:
            print(f"probing {name} ...", flush=True)
        steps[name] = fn()
        return steps[name]

    from .runtime.kernels import kernel_build, native_bf16

    bw = step("memory bandwidth", memory_bandwidth)
    dense = "bf16" if native_bf16() else "fp32"
    flops = step(f"{dense} matmul", matmul_flops)
    kern = step("runtime kernels", kernel_throughput)
    fixed = step("fixed costs", fixed_costs)
    disk = step("disk", disk_bandwidth)
    cache = step("page cache", page_cache_bandwidth)
    engine = step("engine", lambda: engine_rates(fixed))
    mem = free_memory()
    stream = statistics.median(v["bytes_per_s"] for v in kern.values())
    by_bits = {b: statistics.mean(v["bytes_per_s"] for k, v in kern.items() if k.startswith(f"sym{b}-"))
               for b in ("4", "8")}
    # per bits, (bytes one call reads, bytes/s) for each probed shape: small tensors stream at another rate
    by_shape = {b: sorted((v["bytes"], v["bytes_per_s"]) for k, v in kern.items() if k.startswith(f"sym{b}-"))
                for b in ("4", "8")}
    device = {"key": "this", "name": f"this machine ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)",
              "kind": "cpu", "memory": mem, "bandwidth": bw, "flops": {dense: flops}, "link": 0.0,
              "host_link": bw, "disk": disk, "host_memory": 0.0,
              # the runtime streams weights at `stream`, a fraction of the raw read bandwidth
              "efficiency": {"bandwidth": min(1.0, stream / bw), "compute": 1.0, "overhead_s": fixed["per_token_s"],
                             "overhead_layer_s": fixed["per_layer_s"], "stream_by_bits": by_bits,
                             "overhead_moe_layer_s": fixed["per_moe_layer_s"],
                             "overhead_expert_s": fixed["per_expert_s"],
                             "stream_by_shape": by_shape,
                             "page_cache": cache, "engine_by_bits": engine["resident"],
                             "stream_extra": engine["stream_extra"]},
              "source": f"tightfit probe, {time.strftime('%Y-%m-%d %H:%M')}", "verified": True}
    return {"device": device, "measurements": steps, "threads": torch.get_num_threads(),
            "probe_version": PROBE_VERSION, "kernel": kernel_build()}


def save_profile(profile: dict) -> Path:
    p = profile_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p, directory=False, force=True) as tmp:
        tmp.write_text(json.dumps(profile, indent=1))
    return p
