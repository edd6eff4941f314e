"""Plans as files: written by `tightfit plan -o`, executed by `tightfit quantize --plan`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import FormatError, TightfitError
from ..formats.weight import WeightFormat
from .cost import DENSE


class PlanFileError(TightfitError, ValueError):
    """A plan file that cannot be executed."""


REQUIRED = ("hardware", "devices", "context", "batch", "memory_bytes", "predicted", "kv_format", "tensors",
            "placement")


def read_plan(path: str | Path) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PlanFileError(f"--plan {path}: cannot read it as JSON ({e}); write one with `tightfit plan ... -o "
                            "plan.json`.") from e
    missing = [k for k in REQUIRED if k not in plan]
    if missing:
        raise PlanFileError(f"--plan {path} lacks {missing}: it is not a tightfit plan. Write one with "
                            "`tightfit plan MODEL --hardware NAME -o plan.json`.")
    return plan


def formats_from_plan(path: str | Path, cfg, model: str):
    """The QuantConfig whose per-tensor formats are the plan's (bf16 tensors are kept unquantized)."""
    plan = read_plan(path)
    if plan.get("model") not in (model, None):
        raise PlanFileError(f"--plan {path} was made for {plan['model']!r}, not {model!r}; plan this model first.")
    formats = {}
    for name, f in plan["tensors"].items():
        if not name.endswith(".weight"):
            raise PlanFileError(f"--plan {path}: {name!r} is a group of tensors (a config-only plan of an MoE or "
                                "MLA model); tightfit quantizes Llama/Qwen2 tensors by name.")
        try:
            formats[name] = None if f == DENSE else WeightFormat.parse(f)
        except FormatError as e:
            raise PlanFileError(f"--plan {path}: tensor {name} has format {f!r}: {e}") from e
    return replace(cfg, tensor_formats=formats, predicted_kld=plan["predicted"].get("kld"))
