"""Entry points: quantize a model source into an artifact, or a loaded model in place (torchao style)."""

from __future__ import annotations

import torch

from ..data import CALIBRATION, EVALUATION, read_part
from ..errors import QuantizeError
from ..eval.windows import tokenize
from .calibrate import QuantizedModel, quantize_model
from .config import QuantConfig


def calibration_ids(tokenizer, text: str, samples: int, ctx: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `ctx` tokens at random offsets of the text (they overlap when the text is short)."""
    ids = torch.tensor(tokenize(tokenizer, text))
    if ids.numel() < 2 * ctx:
        raise QuantizeError(f"calibration text too short: {ids.numel()} tokens, need at least {2 * ctx} "
                            f"(2 windows of {ctx}). Use a longer text or a smaller calibration context.")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - ctx + 1, (samples,), generator=g)
    return torch.stack([ids[s : s + ctx] for s in starts.tolist()])


def calibration_windows(widest: int, ctx: int, at_least: int = 16, per_width: float = 2.0) -> int:
    """How many calibration windows of `ctx` tokens a model needs: enough fitted tokens that the Hessian of its
    widest linear input (`widest` channels) (a 1.5B Qwen2's down_proj reads 8960 channels) has `per_width` tokens per channel,
    after the held-out eighth; at least `at_least`. With fewer tokens than channels the Hessian is singular and
    GPTQ fits its error into directions the calibration never spans (worse than RTN on other text).
    SmolLM2-135M: 16 x 256; Qwen2.5-1.5B: 80 x 256 (20k tokens); Llama-3.1-8B: 128 x 256; Qwen2.5-7B: 170 x 256."""
    import math

    return max(at_least, math.ceil(per_width * widest / ctx / (1 - QuantConfig.holdout)))


def interleave(text: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Text and generated windows spread evenly through one batch, so that the fitted windows and the held-out
    ones at the end (QuantConfig.holdout) each get their share of both."""
    n, g = text.shape[0] + generated.shape[0], generated.shape[0]
    if not g:
        return text
    at = {int((i + 0.5) * n / g) for i in range(g)}  # g distinct rows: consecutive ones are n/g >= 1 apart
    gi, ti = iter(generated), iter(text)
    rows = [next(gi) if k in at else next(ti) for k in range(n)]
    return torch.stack(rows)


def calibration_mix(source, tokenizer, text: str, cfg: QuantConfig, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """cfg.calib_samples windows of cfg.calib_ctx tokens: a share cfg.calib_generated written by the model itself
    (quant/selfgen.py), the rest from the text. A model the runtime cannot run gets text windows only, and the
    returned record says why."""
    from ..errors import TightfitError
    from .selfgen import SAMPLING, generated_windows

    n_gen = min(round(cfg.calib_samples * cfg.calib_generated), cfg.calib_samples - 1)
    info = {"generated_windows": 0}
    gen = torch.empty(0, cfg.calib_ctx, dtype=torch.long)
    if n_gen:
        try:
            gen = generated_windows(source, n_gen, cfg.calib_ctx, cfg.seed, progress)
            info = {"generated_windows": n_gen, "generated_sampling": SAMPLING}
        except TightfitError as e:  # e.g. an architecture the runtime lacks, or too little memory to run it
            info = {"generated_windows": 0, "generated_skipped": str(e)}
    ids = calibration_ids(tokenizer, text, cfg.calib_samples - gen.shape[0], cfg.calib_ctx, cfg.seed)
    return interleave(ids, gen), info


def calibration_text(path: str | None) -> tuple[str, dict]:
    """The calibration part by default; never the evaluation part."""
    if path is None:
        text, name, digest = read_part(CALIBRATION), f"tightfit:{CALIBRATION.path.name}", CALIBRATION.sha256
    else:
        from ..cli.common import read_text_arg  # same checks as --text

        text, name, digest = read_text_arg(path)
    if digest == EVALUATION.sha256:
        raise QuantizeError("refusing to calibrate on the evaluation text (sotu-eval-2016-2021): it is held out "
                            "for `tightfit eval`. Calibrate on the calibration part (the default) or your own text.")
    return text, {"text": name, "sha256": digest}


def quantize(source, cfg: QuantConfig, out, *, calib: str | None = None, progress: bool = False,
             force: bool = False) -> dict:
    """Quantize MODEL source into an artifact folder OUT; returns its manifest."""
    from ..models import load_lazy
    from .artifact import save_artifact

    lazy = load_lazy(source)
    ids, calib_info = None, None
    # rtn/hqq read calibration text only when asked (--calib), to report each tensor's output error; a plan's
    # formats alone do not need it (128 x 512 tokens through every layer costs minutes on 2 cores)
    if cfg.needs_calibration or calib is not None:
        text, calib_info = calibration_text(calib)
        if cfg.needs_calibration:
            ids, mix = calibration_mix(source, lazy.tokenizer, text, cfg, progress)
        else:  # rtn/hqq only report their output error on it
            ids, mix = calibration_ids(lazy.tokenizer, text, cfg.calib_samples, cfg.calib_ctx, cfg.seed), {}
        calib_info |= {"samples": cfg.calib_samples, "ctx": cfg.calib_ctx, "seed": cfg.seed} | mix
    qm = quantize_model(lazy, cfg, ids, progress=progress)
    extra = {k: qm.extra[k] for k in ("guard", "experts") if k in qm.extra} or None
    return save_artifact(out, qm, lazy, calibration=calib_info, source=str(source), extra=extra, force=force)


def quantize_(lm, config: QuantConfig, calib_ids: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize a LoadedModel in place: its weights become the dequantized quantized weights.

    Returns the QuantizedModel (codes, scales, errors) for inspection or saving.
    """
    from ..models.lazy import lazy_from_loaded

    lazy = lazy_from_loaded(lm)
    if config.needs_calibration and calib_ids is None:
        raise QuantizeError(f"{config.method} needs calibration token ids: pass calib_ids")
    qm = quantize_model(lazy, config, calib_ids)
    new = {name: qw.dequantize() for name, qw in qm.weights.items()} | qm.kept
    lm.model.load_state_dict(new, strict=False)
    if lm.config.tie_word_embeddings:
        lm.model.tie_weights()
    return qm
