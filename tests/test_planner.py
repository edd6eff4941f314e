"""The planner: cost model against hand-computed figures, the MILP against exhaustive search, constraints,
infeasible requests, recipes, and plan -> quantize."""

import itertools
import json
import math
import re

import pytest

from tightfit.cli import main
from tightfit.hardware import Device, HardwareError, catalog, get_device
from tightfit.planner.cost import (
    FORMATS,
    Workload,
    fits,
    item_bytes,
    kv_bytes,
    prior_loss,
    tensor_bytes,
)
from tightfit.planner.optimize import RESERVE, PlanError, solve
from tightfit.planner.recipe import recipe, tp_problems
from tightfit.planner.spec import load_spec, spec_from_config

GB = 1e9


def test_catalog_is_data_with_sources():
    devices = catalog()
    for key in ("h100-sxm", "h200", "h20", "a100-40gb", "a100-80gb", "l40s", "l20", "rtx-4090", "rtx-4090d",
                "rtx-3090", "ascend-910b", "apple-m2-pro", "apple-m4-max", "ddr4-desktop", "ddr5-desktop"):
        d = devices[key]
        assert d.memory > 0 and d.bandwidth > 0 and d.flops and d.source
    assert not devices["ascend-910b"].verified
    with pytest.raises(HardwareError, match=re.escape("unknown hardware 'h100': choose one of")):
        get_device("h100")


def test_cost_model_against_hand_computed_figures():
    gpu = get_device("h100-sxm")
    # sym4-g32, 4096x4096: 4 bits per weight plus one fp16 scale per 32 weights
    assert tensor_bytes("sym4-g32", (4096, 4096), gpu) == 4096 * 4096 // 2 + 4096 * 128 * 2
    assert tensor_bytes("bf16", (4096, 4096), gpu) == 2 * 4096 * 4096
    # Llama-3.1-8B (GQA, 8 KV heads of 128): 32 layers x (K + V) x 8 x 128 x 2 bytes = 128 KiB per token
    spec = load_spec("llama-3.1-8b")
    assert kv_bytes(spec, "bf16", Workload(context=4096)) == 32 * 2 * 8 * 128 * 2 * 4096
    # int8 KV: one byte per element plus a bf16 scale and zero per head vector
    assert kv_bytes(spec, "int8", Workload(context=1)) == 32 * (2 * 8 * 128 + 2 * 2 * 2 * 8)
    # MoE: Mixtral 8x7B has 46.7B parameters, 12.9B active per token (Mistral AI's figures)
    mix = load_spec("mixtral-8x7b")
    assert mix.params / 1e9 == pytest.approx(46.7, abs=0.1) and mix.active_params / 1e9 == pytest.approx(12.9, abs=0.1)
    ds = load_spec("deepseek-v3")  # 671B total, 37B active (DeepSeek-V3 report, without the MTP module)
    assert ds.params / 1e9 == pytest.approx(671, abs=2) and ds.active_params / 1e9 == pytest.approx(37.5, abs=1)
    assert ds.kv_elems_per_token_layer == 512 + 64  # MLA caches the compressed latent and the rope key


def tiny_spec():
    return spec_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                             "vocab_size": 256, "tie_word_embeddings": True}, "tiny")


def small_device(memory: float) -> Device:
    return Device(key="toy", name="toy", kind="gpu", memory=memory, bandwidth=1e9, flops={"bf16": 1e12},
                  host_link=1e8, host_memory=1e9, disk=1e7)


def brute_force(spec, device, w, formats, min_tok_s):
    """Every (format per item, placement per layer, KV format): the best predicted loss that meets the limits."""
    from tightfit.planner.cost import fixed_decode_seconds, placement_bandwidth
    from tightfit.planner.optimize import RESERVE

    cap = device.memory * (1 - RESERVE)
    from tightfit.planner.cost import activation_bytes
    act = activation_bytes(spec, w)
    best = None
    layer_items = [it for it in spec.items if it.layer is not None]
    other = [it for it in spec.items if it.layer is None]
    for places in itertools.product(("device", "host", "disk"), repeat=spec.n_layers):
        for fmts in itertools.product(formats, repeat=len(spec.items)):
            for kv in ("bf16", "int8", "int4"):
                mem = kv_bytes(spec, kv, w)
                t = kv_bytes(spec, kv, w) / placement_bandwidth(device, "device")
                loss = {"bf16": 0.0, "int8": 0.002, "int4": 0.08}[kv]
                ok = True
                for it, f in zip(layer_items + other, fmts):
                    if not fits(f, it.shape):
                        ok = False
                        break
                    p = places[it.layer] if it.layer is not None else "device"
                    b = item_bytes(it, f, device, spec.tied)
                    mem += b if p == "device" else 0
                    t += b / placement_bandwidth(device, p)
                    loss += 0.0 if f == "bf16" else prior_loss(spec, it, f)
                if not ok or mem > cap - act or t + fixed_decode_seconds(spec, device, w) > 1 / min_tok_s:
                    continue
                if best is None or loss < best - 1e-12:
                    best = loss
    return best


def test_milp_matches_exhaustive_search_on_a_small_instance():
    spec = spec_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                             "vocab_size": 64, "tie_word_embeddings": True}, "toy")
    # fold each layer to two items so that exhaustive search stays small
    from dataclasses import replace
    items = tuple(it for it in spec.items if it.role in ("q", "down") or it.layer is None)
    spec = replace(spec, items=items)
    formats = ("sym4-g32", "sym8-pc", "bf16")
    w = Workload(context=64)
    device = small_device(memory=60_000)
    for target in (200.0, 400.0, 1000.0):
        want = brute_force(spec, device, w, formats, target)
        if want is None:
            with pytest.raises(PlanError):
                solve(spec, device, w, min_tok_s=target, formats=formats)
            continue
        plan = solve(spec, device, w, min_tok_s=target, formats=formats)
        assert plan.predicted["kld"] == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert plan.predicted["decode_tok_s"] >= target * (1 - 1e-6)


def test_plan_respects_limits_and_beats_every_uniform_format_that_fits():
    spec = load_spec("llama-3.1-8b")
    dev = get_device("rtx-4090")
    w = Workload(context=8192)
    plan = solve(spec, dev, w, min_tok_s=40)
    assert plan.memory_bytes["total"] <= dev.memory * 0.95 + 1 and plan.predicted["decode_tok_s"] >= 40
    t = plan.tensors
    for layer in range(spec.n_layers):  # fused matmuls (q/k/v, gate/up) hold one format
        assert len({t[f"model.layers.{layer}.self_attn.{x}_proj.weight"] for x in "qkv"}) == 1
        assert len({t[f"model.layers.{layer}.mlp.{x}_proj.weight"] for x in ("gate", "up")}) == 1
    for fmt in FORMATS["gpu"]:
        try:
            uniform = solve(spec, dev, w, min_tok_s=40, formats=(fmt,))
        except PlanError:
            continue
        assert plan.predicted["kld"] <= uniform.predicted["kld"] + 1e-9


def test_infeasible_requests_say_what_is_missing_and_the_nearest_plan():
    with pytest.raises(PlanError, match=r"cannot reach 500 tok/s: the fastest plan that fits gives [0-9.]+ tok/s \(KV "):
        solve(load_spec("llama-3.1-8b"), get_device("rtx-3090"), Workload(context=4096), min_tok_s=500)
    with pytest.raises(PlanError, match="need [0-9.]+ GB of [0-9.]+ GB usable"):
        solve(load_spec("llama-3.1-405b"), get_device("apple-m2"), Workload(context=131072, batch=8))


def test_recipes_check_the_engines_constraints():
    spec = load_spec("smollm2-135m")  # 9 heads, 3 KV heads
    assert tp_problems(spec, 2)[0] == "9 attention heads are not divisible by 2"
    dev = get_device("h100-sxm")
    plan = solve(spec, dev, Workload(context=2048, devices=2))
    lines = recipe(spec, dev, plan)
    assert lines[0].startswith("vLLM cannot use --tensor-parallel-size 2: 9 attention heads are not divisible by 2")
    assert "--pipeline-parallel-size 2" in lines[1]
    big = load_spec("llama-3.1-70b")
    plan = solve(big, dev, Workload(context=8192, devices=8))
    assert "vllm serve DIR --tensor-parallel-size 8" in recipe(big, dev, plan)[0]


def test_plan_cli_writes_a_plan_that_quantize_executes(tiny_models, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_models["llama"]), "--hardware", "ddr5-desktop", "--context", "256",
                 "--max-memory", "2.6MB", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    for key in ("hardware", "devices", "context", "batch", "memory_bytes", "predicted", "kv_format", "tensors",
                "placement"):
        assert key in plan
    assert set(plan["memory_bytes"]) >= {"weights", "kv_cache", "activations", "total"}
    assert plan["memory_bytes"]["total"] <= 2.6e6
    assert main(["quantize", str(tiny_models["llama"]), "--method", "rtn", "--plan", str(out), "-o",
                 str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name, fmt in plan["tensors"].items():
        assert manifest["tensors"][name]["format"] == ("float32" if fmt == "bf16" else fmt)
    capsys.readouterr()
    assert main(["plan", "deepseek-v3", "--hardware", "h20", "--devices", "8", "--context", "8192", "--json"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["devices"] == 8 and ds["predicted"]["decode_tok_s"] > 0


def test_fit_plans_quantizes_measures_and_reports(tiny_models, tmp_path, capsys):
    assert main(["fit", str(tiny_models["llama"]), "--hardware", "ddr5-desktop", "--max-memory", "2.6MB",
                 "--context", "256", "-o", str(tmp_path / "fit")]) == 0
    res = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert res["plan"]["sensitivity"] == "measured"
    assert res["measured"]["kld"] >= 0 and "decode_tok_s" in res["measured"]
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "| decode tokens/s |" in report and (tmp_path / "fit" / "fit.png").stat().st_size > 1000
    assert (tmp_path / "fit" / "artifact" / "manifest.json").is_file()
    with pytest.raises(PlanError, match="predicts KLD"):
        from tightfit.fit import fit
        fit(str(tiny_models["llama"]), tmp_path / "fit2", hardware="ddr5-desktop", max_memory=2.6e6, context=256,
            max_kld=1e-9, progress=False, log=lambda s: None)
    assert not (tmp_path / "fit2").exists()


def test_streamed_layers_are_priced_from_the_page_cache_only_when_free_ram_holds_the_model():
    from tightfit.planner.cost import placement_bandwidth, served_from_page_cache

    spec = tiny_spec()
    w = Workload(context=64)

    def cpu(free_ram):
        return Device(key="box", name="box", kind="cpu", memory=free_ram, bandwidth=1e9, flops={"bf16": 1e12},
                      disk=1e7, efficiency={"bandwidth": 1.0, "compute": 1.0, "overhead_s": 0.0,
                                            "stream_by_bits": {"4": 1e9, "8": 1e9}, "page_cache": 4e9})

    big, small = cpu(10 * GB), cpu(200e3)
    # a streamed layer is copied into the arena, then read by the kernel: the times add
    assert placement_bandwidth(big, "disk", "sym8-g32", cached=True) == pytest.approx(1 / (1 / 4e9 + 1 / 1e9))
    assert placement_bandwidth(big, "disk", "sym8-g32") == pytest.approx(1 / (1 / 1e7 + 1 / 1e9))
    assert served_from_page_cache(big, 5e6, max_memory=1e6)
    assert not served_from_page_cache(small, 5e6, max_memory=1e6)  # the cache cannot hold it: disk
    assert not served_from_page_cache(big, 5e6, max_memory=None)  # no budget: nothing is streamed
    full = solve(spec, big, w)
    for frac in (0.5, 0.45, 0.4, 0.35, 0.3):  # the largest budget at which fewer bits alone no longer fit
        budget = (full.memory_bytes["total"] - (1 - frac) * full.memory_bytes["weights"]) / (1 - RESERVE)
        cached = solve(spec, big, w, max_memory=budget)
        if "disk" in cached.placement.values():
            break
    cold = solve(spec, small, w, max_memory=budget)
    assert "disk" in cached.placement.values() and "disk" in cold.placement.values()
    assert cached.constraints["streamed_from"] == "page cache" and cold.constraints["streamed_from"] == "disk"
    assert full.constraints["streamed_from"] is None
    assert cached.predicted["decode_tok_s"] > 10 * cold.predicted["decode_tok_s"]
    # where the probe timed what streaming adds to a decode step, that is the cached copy's rate
    hot = cpu(10 * GB)
    hot.efficiency["stream_extra"] = {"4": 2e9, "8": 3e9}
    assert placement_bandwidth(hot, "disk", "sym8-g32", cached=True) == pytest.approx(1 / (1 / 3e9 + 1 / 1e9))
    assert placement_bandwidth(hot, "disk", "sym4-g32", cached=True) == pytest.approx(1 / (1 / 2e9 + 1 / 1e9))
    assert placement_bandwidth(hot, "disk", "sym8-g32") == pytest.approx(1 / (1 / 1e7 + 1 / 1e9))


def test_a_streaming_plan_reads_embedding_rows_from_disk_as_the_runtime_does():
    from tightfit.planner.cost import item_bytes, tensor_bytes

    spec = tiny_spec()
    w = Workload(context=64)
    box = Device(key="box", name="box", kind="cpu", memory=10 * GB, bandwidth=1e9, flops={"bf16": 1e12},
                 disk=1e7, efficiency={"bandwidth": 1.0, "compute": 1.0, "overhead_s": 0.0, "page_cache": 4e9})
    full = solve(spec, box, w, formats=("sym8-g32",))
    assert full.embedding_rows == "device" and not full.streams
    embed = next(it for it in spec.items if it.role == "embed")
    fmt = full.tensors[embed.name]
    # resident, a tied embedding is held twice (head kernel layout + row codes); streaming, only the head stays
    saved = item_bytes(embed, fmt, box, spec.tied) - tensor_bytes(fmt, embed.shape, box)
    assert saved > 0
    budget = (full.memory_bytes["total"] - 0.5 * saved) / (1 - RESERVE)
    tight = solve(spec, box, w, max_memory=budget, formats=("sym8-g32",))
    # the row copy goes to disk before any layer does: it costs no time per token
    assert tight.embedding_rows == "disk" and tight.streams and set(tight.placement.values()) == {"device"}
    assert tight.memory_bytes["total"] <= budget * (1 - RESERVE) + 1
    assert "embedding rows read from disk" not in json.dumps(tight.to_dict())  # a field, not prose
    assert tight.to_dict()["embedding_rows"] == "disk"


def test_probe_measures_page_cache_streaming_through_the_runtimes_streamer():
    from tightfit.probe import page_cache_bandwidth

    rate = page_cache_bandwidth(units=3, rows=256, cols=256)  # bytes/s; how fast is bench's business
    assert math.isfinite(rate) and rate > 0


def test_probe_times_the_fused_engine_and_what_streaming_adds_to_it():
    from tightfit.probe import engine_rates

    r = engine_rates({"per_token_s": 0.0, "per_layer_s": 0.0}, layers=3, hidden=128, ffn=256, steps=4)
    for kind in ("resident", "stream_extra"):
        assert set(r[kind]) == {"4", "8"} and all(math.isfinite(v) and v > 0 for v in r[kind].values())


def test_kernel_rate_follows_the_probed_shapes():
    from tightfit.planner.cost import kernel_rate

    dev = Device(key="box", name="box", kind="cpu", memory=GB, bandwidth=5e10, flops={"bf16": 1e12},
                 efficiency={"stream_by_bits": {"4": 2.5e10, "8": 3e10},
                             "stream_by_shape": {"4": [[1e6, 3e10], [1e7, 2e10]], "8": [[1e6, 4e10], [1e7, 3e10]]}})
    assert kernel_rate(dev, "sym4-g32", 1e6) == pytest.approx(3e10)
    assert kernel_rate(dev, "asym3-g32", 10 ** 6.5) == pytest.approx(2.5e10)  # halfway in log-size
    assert kernel_rate(dev, "sym4-g32", 1e9) == pytest.approx(2e10) and kernel_rate(dev, "sym4-g32", 1e3) == 3e10
    assert kernel_rate(dev, "sym8-g32", None) == 3e10  # no size: the mean over shapes
    # where the probe timed the fused engine, a decoder layer's tensors take its rate; the head keeps the shape's
    dev.efficiency["engine_by_bits"] = {"4": 3.5e10, "8": 4.5e10}
    assert kernel_rate(dev, "sym4-g32", 1e6, in_layer=True) == 3.5e10
    assert kernel_rate(dev, "sym8-g32", 1e7, in_layer=True) == 4.5e10
    assert kernel_rate(dev, "sym8-g32", 1e7) == pytest.approx(3e10)


def test_a_fixed_plan_is_priced_as_the_solver_priced_it_and_reprices_on_another_profile():
    import dataclasses

    from tightfit.planner.optimize import decode_seconds

    spec = tiny_spec()
    w = Workload(context=64)
    box = Device(key="box", name="box", kind="cpu", memory=10 * GB, bandwidth=1e9, flops={"bf16": 1e12},
                 disk=1e7, efficiency={"bandwidth": 1.0, "compute": 1.0, "overhead_s": 1e-4, "page_cache": 4e9,
                                       "engine_by_bits": {"4": 2e9, "8": 3e9}, "stream_extra": {"4": 2e9, "8": 3e9}})
    full = solve(spec, box, w)
    plans = [full, solve(spec, box, w, formats=("sym4-g32",))]
    for frac in (0.5, 0.4, 0.3):
        budget = (full.memory_bytes["total"] - (1 - frac) * full.memory_bytes["weights"]) / (1 - RESERVE)
        plans.append(solve(spec, box, w, max_memory=budget))
    assert any(p.streams for p in plans)
    for p in plans:
        assert decode_seconds(spec, box, w, p) == pytest.approx(p.predicted["decode_s_per_step"], rel=1e-9)
    # the same plan on a machine whose engine runs at half the rate: every layer tensor costs twice as long
    slow = dataclasses.replace(box, efficiency=box.efficiency | {"engine_by_bits": {"4": 1e9, "8": 1.5e9}})
    assert decode_seconds(spec, slow, w, plans[0]) > decode_seconds(spec, box, w, plans[0])
    other = dataclasses.replace(plans[0], tensors={})
    with pytest.raises(PlanError, match="no format for .*made for another model"):
        decode_seconds(spec, box, w, other)


def test_an_interrupted_fit_leaves_no_output_and_its_rerun_resumes(tiny_models, tmp_path, monkeypatch):
    import tightfit.eval

    from tightfit.fit import fit

    out = tmp_path / "fit"
    kw = dict(hardware="ddr5-desktop", max_memory=2.6e6, context=256, progress=False)

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a user's Ctrl-C during the evaluation

    monkeypatch.setattr(tightfit.eval, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(str(tiny_models["llama"]), out, log=lambda s: None, **kw)
    assert not out.exists()
    stages = tmp_path / ".fit.stages"
    assert (stages / "sensitivities.json").is_file() and (stages / "artifact" / "manifest.json").is_file()
    monkeypatch.undo()
    lines = []
    res = fit(str(tiny_models["llama"]), out, log=lines.append, **kw)
    reused = [s for s in lines if "reusing" in s]
    assert len(reused) == 3 and "sensitivities" in reused[0] and "quantize" in reused[2], lines
    assert (out / "report.md").is_file() and (out / "fit.png").is_file() and res["measured"]["kld"] >= 0
    assert not stages.exists() and not (out / "inputs.json").exists()
    # other arguments: the stages of the first fit are not reused
    lines.clear()
    fit(str(tiny_models["llama"]), tmp_path / "fit", force=True, log=lines.append, **(kw | {"context": 128}))
    assert not [s for s in lines if "reusing" in s]
