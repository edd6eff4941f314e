"""`tightfit fit`: measure sensitivities, plan, quantize, evaluate against the original, measure speed and
memory, and write a report comparing every prediction with its measurement."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .io import check_target, publish, write_json



def _profile_is_stale() -> bool:
    """A profile written by an older probe than the cost model now reads (probe.PROBE_VERSION), or measured
    under another form of the runtime's kernel (torch's int4 op before the kernel could build here, say: its
    speeds are not this runtime's)."""
    from .hardware import profile_path
    from .probe import PROBE_VERSION
    from .runtime.kernels import kernel_build

    try:
        profile = json.loads(profile_path().read_text())
        return profile.get("probe_version", 0) < PROBE_VERSION or profile.get("kernel") != kernel_build()
    except (OSError, ValueError, AttributeError):
        return True


def measured_losses(source, formats: list[str], method: str = "rtn", windows: int = 8, ctx: int = 256,
                    progress: bool = False) -> dict:
    """Per (tensor, format) predicted KLD of quantizing with `method`: the diagonal Fisher on calibration text
    times the method's error (quant/mixed.py), measured layer by layer (one layer resident at a time)."""
    from .formats.weight import WeightFormat
    from .models import load_lazy
    from .quant.api import calibration_ids, calibration_text
    from .quant.config import QuantConfig
    from .quant.mixed import priced_sensitivities

    lazy = load_lazy(source)
    text, _ = calibration_text(None)
    ids = calibration_ids(lazy.tokenizer, text, windows, ctx, 1)
    sens, _, _ = priced_sensitivities(lazy, ids, QuantConfig(method=method),
                                      [WeightFormat.parse(f) for f in formats], progress)
    return {n: {f.name: float(sens.loss[i, j]) for j, f in enumerate(sens.formats)} for i, n in enumerate(sens.names)}


def decode_speed(lm, tokens: int = 32, rounds: int = 3) -> float:
    """Decode tokens/s: the median of `rounds` timed runs after a warm-up run (the first run after a load pays
    page faults and cold caches: 10-15% below the later ones at 1.5B; a single 64-token run in fit's last stage
    once read 11 tok/s on the 1.5B shape, where an 8-bit artifact of it reads 17-19 in runs like these)."""
    from .runtime import generate

    ids = lm.tokenizer("The state of the union is")["input_ids"]
    speeds = []
    for r in range(rounds + 1):
        t, n = None, 0
        for _ in generate(lm.model, lm.tokenizer, ids, tokens, ignore_eos=True):
            n += 1
            t = t or time.perf_counter()
        if r:  # round 0 warms up
            speeds.append((n - 1) / (time.perf_counter() - t))
    return sorted(speeds)[len(speeds) // 2]


STAGES = ("sensitivities", "plan", "quantize", "evaluate", "speed")


def _stage(work: Path, name: str, log, compute):
    """A stage's JSON result: read back if an earlier run finished it, else computed and written at once."""
    path = work / f"{name}.json"
    if path.is_file():
        log(f"    {name}: reusing the result of an earlier run ({path})")
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def fit(model: str, out: str | Path, *, hardware: str = "this", max_memory: float | None = None,
        min_tok_s: float | None = None, max_kld: float | None = None, context: int = 2048, method: str = "rtn",
        eval_chunks: int = 4, force: bool = False, progress: bool = True, log=print) -> dict:
    """The whole loop. OUT appears only when every stage is done; until then each finished stage's result
    lies in .OUT.stages/ beside it, and a rerun with the same arguments resumes from there."""
    from . import __version__
    from .data import EVALUATION, read_part
    from .eval import evaluate
    from .eval.reference import load_reference
    from .hardware import get_device, profile_path
    from .planner.cost import DENSE, FORMATS, Workload
    from .planner.optimize import PlanError, solve
    from .planner.plan_io import formats_from_plan
    from .planner.spec import load_spec
    from .quant.api import quantize
    from .quant.config import QuantConfig
    from .runtime import load_runtime

    t0 = time.time()
    out = Path(out)
    check_target(out, force)
    if hardware == "this" and (not profile_path().is_file() or _profile_is_stale()):
        from .probe import probe, save_profile

        log("no current profile of this machine yet: probing it (about a minute)")
        save_profile(probe(progress=progress))
    device = get_device(hardware)
    spec = load_spec(model)
    inputs = {"model": str(model), "hardware": device.key, "max_memory": max_memory, "min_tok_s": min_tok_s,
              "context": context, "method": method, "eval_chunks": eval_chunks, "tightfit_version": __version__}
    work = out.with_name(f".{out.name}.stages")
    if work.is_dir():
        before = json.loads((work / "inputs.json").read_text()) if (work / "inputs.json").is_file() else None
        if before != inputs:
            log(f"{work} holds stages of another fit ({before}); starting clean")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "inputs.json", inputs)

    log(f"[1/5] measuring sensitivities of {spec.name} ({spec.params / 1e6:.0f}M parameters, layer by layer)")
    losses = _stage(work, "sensitivities", log, lambda: measured_losses(
        model, [f for f in FORMATS[device.kind] if f != DENSE], method, progress=progress))
    log(f"[2/5] planning for {device.name}" + (f" within {max_memory / 1e6:.0f} MB" if max_memory else ""))

    def make_plan():
        plan = solve(spec, device, Workload(context), min_tok_s=min_tok_s, max_memory=max_memory, losses=losses)
        plan.model = model
        return plan.to_dict() | {"streams": plan.streams}

    plan = _stage(work, "plan", log, make_plan)
    if max_kld is not None and plan["predicted"]["kld"] > max_kld:
        raise PlanError(f"the best plan within the limits predicts KLD {plan['predicted']['kld']:.4f} > --max-kld "
                        f"{max_kld}: raise --max-memory or lower --min-tok-s.")
    log(f"[3/5] quantizing ({method}) as planned: predicted KLD {plan['predicted']['kld']:.4f}, "
        f"{plan['predicted']['decode_tok_s']:.0f} tok/s")
    artifact = work / "artifact"
    if (artifact / "manifest.json").is_file():
        log(f"    quantize: reusing the artifact of an earlier run ({artifact})")
        manifest = json.loads((artifact / "manifest.json").read_text())
    else:
        from .quant.api import calibration_windows

        samples = calibration_windows(max(it.shape[1] for it in spec.items if it.layer is not None), 256)
        cfg = formats_from_plan(work / "plan.json", QuantConfig(method=method, calib_samples=samples, calib_ctx=256),
                                model)
        manifest = quantize(model, cfg, artifact, progress=progress, force=True)  # written atomically
    budget = int(plan["memory_bytes"]["weights"]) if plan.get("streams") else None

    def evaluate_stage():
        lm = load_runtime(artifact, plan["kv_format"], max_memory=budget)
        base = load_reference(model)
        r = evaluate(lm, read_part(EVALUATION), text_name="eval", text_sha256=EVALUATION.sha256, ctx=512,
                     chunks=eval_chunks, base=base, progress=progress)
        return r.to_dict()

    log("[4/5] evaluating against the original (the original runs layer by layer in fp32)")
    r = _stage(work, "evaluate", log, evaluate_stage)
    log("[5/5] measuring speed and memory")

    def speed_stage():
        lm = load_runtime(artifact, plan["kv_format"], max_memory=budget)
        wb = lm.model.weight_bytes()
        return {"decode_tok_s": decode_speed(lm),
                "weight_bytes_resident": wb.get("resident", wb["per_token"] + wb.get("embedding", 0))}

    speed = _stage(work, "speed", log, speed_stage)
    result = {"model": model, "hardware": device.key, "plan": plan,
              "measured": {"kld": r["kld_mean"], "kld_stderr": r["kld_stderr"], "perplexity": r["perplexity"],
                           "base_perplexity": r["base_perplexity"], "top1": r["top1_agreement"],
                           "decode_tok_s": speed["decode_tok_s"],
                           "weight_bytes_resident": speed["weight_bytes_resident"],
                           "bits_per_weight": manifest["bits_per_weight"]},
              "seconds": time.time() - t0}
    write_json(work / "fit.json", result)
    _report(work, result)
    (work / "inputs.json").unlink()
    for name in STAGES:  # their numbers are in fit.json; plan.json stays (quantize --plan reads it)
        if name != "plan":
            (work / f"{name}.json").unlink(missing_ok=True)
    publish(work, out)
    log(f"wrote {out}/report.md")
    return result


def _report(folder: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, m = res["plan"]["predicted"], res["measured"]
    mem_pred = res["plan"]["memory_bytes"]["weights"]
    rows = [("KLD vs original (nats/token)", p["kld"], m["kld"]),
            ("decode tokens/s", p["decode_tok_s"], m["decode_tok_s"]),
            ("resident weight MB", mem_pred / 1e6, m["weight_bytes_resident"] / 1e6)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (label, a, b) in zip(axes, rows):
        ax.bar(["predicted", "measured"], [a, b], color=["#999", "#36c"])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{res['model']} on {res['hardware']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "fit.png", dpi=110)
    plt.close(fig)
    from collections import Counter

    formats = Counter(res["plan"]["tensors"].values())
    summary = (f"Plan: {', '.join(f'{n} tensors {f}' for f, n in formats.most_common())}; KV cache "
               f"{res['plan']['kv_format']}; layers {dict(Counter(res['plan']['placement'].values()))}; "
               f"{m['bits_per_weight']:.3f} bits per weight.")
    lines = [f"# tightfit fit: {res['model']} on {res['hardware']}", "", summary, "",
             "| | predicted | measured | measured / predicted |", "|---|---|---|---|"]
    lines += [f"| {label} | {a:.4g} | {b:.4g} | {b / a if a else float('nan'):.2f} |" for label, a, b in rows]
    quality = (f"Perplexity {m['perplexity']:.3f} (original {m['base_perplexity']:.3f}), top-1 agreement "
               f"{100 * m['top1']:.1f}%, KLD {m['kld']:.4f} ± {m['kld_stderr']:.4f}.")
    took = f"Took {res['seconds']:.0f} s. Artifact: `artifact/`, plan: `plan.json`, numbers: `fit.json`."
    lines += ["", quality, "", "![predicted vs measured](fit.png)", "", took]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
