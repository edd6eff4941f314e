"""`tightfit fit`: measure sensitivities, plan, quantize, evaluate against the original, measure speed and
memory, and write a report comparing every prediction with its measurement."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .io import atomic_path


def measured_losses(lm, formats: list[str], method: str = "rtn", windows: int = 8, ctx: int = 256,
                    progress: bool = False) -> dict:
    """Per (tensor, format) predicted KLD of quantizing with `method`: the diagonal Fisher on calibration text
    times the method's error (quant/mixed.py)."""
    from .formats.weight import WeightFormat
    from .quant.api import calibration_ids, calibration_text
    from .quant.config import QuantConfig
    from .quant.mixed import priced_sensitivities

    text, _ = calibration_text(None)
    ids = calibration_ids(lm.tokenizer, text, windows, ctx, 1)
    sens, _, _ = priced_sensitivities(lm.model, ids, QuantConfig(method=method),
                                      [WeightFormat.parse(f) for f in formats], progress)
    return {n: {f.name: float(sens.loss[i, j]) for j, f in enumerate(sens.formats)} for i, n in enumerate(sens.names)}


def decode_speed(lm, tokens: int = 64) -> float:
    from .runtime import generate

    ids = lm.tokenizer("The state of the union is")["input_ids"]
    for _ in generate(lm.model, lm.tokenizer, ids, 8, ignore_eos=True):
        pass
    t, n = None, 0
    for _ in generate(lm.model, lm.tokenizer, ids, tokens, ignore_eos=True):
        n += 1
        t = t or time.perf_counter()
    return (n - 1) / (time.perf_counter() - t)


def fit(model: str, out: str | Path, *, hardware: str = "this", max_memory: float | None = None,
        min_tok_s: float | None = None, max_kld: float | None = None, context: int = 2048, method: str = "rtn",
        eval_chunks: int = 4, force: bool = False, progress: bool = True, log=print) -> dict:
    from . import load
    from .data import EVALUATION, read_part
    from .eval import evaluate
    from .hardware import get_device, profile_path
    from .planner.cost import DENSE, FORMATS, Workload
    from .planner.optimize import PlanError, solve
    from .planner.plan_io import formats_from_plan
    from .planner.spec import load_spec
    from .quant.api import quantize
    from .quant.config import QuantConfig
    from .runtime import load_runtime

    t0 = time.time()
    if hardware == "this" and not profile_path().is_file():
        from .probe import probe, save_profile

        log("no profile of this machine yet: probing it (about a minute)")
        save_profile(probe(progress=progress))
    device = get_device(hardware)
    spec = load_spec(model)
    log(f"[1/5] measuring sensitivities of {spec.name} ({spec.params / 1e6:.0f}M parameters)")
    base = load(model, progress=progress)
    losses = measured_losses(base, [f for f in FORMATS[device.kind] if f != DENSE], method, progress=progress)
    log(f"[2/5] planning for {device.name}" + (f" within {max_memory / 1e6:.0f} MB" if max_memory else ""))
    plan = solve(spec, device, Workload(context), min_tok_s=min_tok_s, max_memory=max_memory, losses=losses)
    plan.model = model
    if max_kld is not None and plan.predicted["kld"] > max_kld:
        raise PlanError(f"the best plan within the limits predicts KLD {plan.predicted['kld']:.4f} > --max-kld "
                        f"{max_kld}: raise --max-memory or lower --min-tok-s.")
    with atomic_path(out, directory=True, force=force) as tmp:
        (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
        log(f"[3/5] quantizing ({method}) as planned: predicted KLD {plan.predicted['kld']:.4f}, "
            f"{plan.predicted['decode_tok_s']:.0f} tok/s")
        cfg = formats_from_plan(tmp / "plan.json", QuantConfig(method=method, calib_samples=16, calib_ctx=256), model)
        manifest = quantize(model, cfg, tmp / "artifact", progress=progress)
        budget = int(plan.memory_bytes["weights"]) if plan.streams else None
        log("[4/5] evaluating against the original")
        lm = load_runtime(tmp / "artifact", plan.kv_format, max_memory=budget)
        r = evaluate(lm, read_part(EVALUATION), text_name="eval", text_sha256=EVALUATION.sha256, ctx=512,
                     chunks=eval_chunks, base=base, progress=progress)
        log("[5/5] measuring speed and memory")
        tok_s = decode_speed(lm)
        wb = lm.model.weight_bytes()
        resident = wb.get("resident", wb["per_token"] + wb.get("embedding", 0))
        result = {"model": model, "hardware": device.key, "plan": plan.to_dict(),
                  "measured": {"kld": r.kld_mean, "kld_stderr": r.kld_stderr, "perplexity": r.perplexity,
                               "base_perplexity": r.base_perplexity, "top1": r.top1_agreement,
                               "decode_tok_s": tok_s, "weight_bytes_resident": resident,
                               "bits_per_weight": manifest["bits_per_weight"]},
                  "seconds": time.time() - t0}
        (tmp / "fit.json").write_text(json.dumps(result, indent=1))
        _report(tmp, result)
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
