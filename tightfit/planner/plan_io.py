"""Plans as files: written by `tightfit plan -o`, executed by `tightfit quantize --plan`."""

from __future__ import annotations

import json
import re
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
    if not isinstance(plan, dict):
        raise PlanFileError(f"--plan {path} holds {type(plan).__name__}, not a JSON object: it is not a tightfit plan. "
                            "Write one with `tightfit plan MODEL --hardware NAME -o plan.json`.")
    missing = [k for k in REQUIRED if k not in plan]
    if missing:
        raise PlanFileError(f"--plan {path} lacks {missing}: it is not a tightfit plan. Write one with "
                            "`tightfit plan MODEL --hardware NAME -o plan.json`.")
    for key, kind in (("tensors", dict), ("predicted", dict), ("placement", (dict, list))):
        if not isinstance(plan[key], kind):
            raise PlanFileError(f"--plan {path}: {key!r} is {type(plan[key]).__name__}, not what `tightfit plan` "
                                "writes; the file is damaged. Write it again.")
    if plan.get("model") is not None and not isinstance(plan["model"], str):
        raise PlanFileError(f"--plan {path}: 'model' is not a string; the file is damaged. Write it again.")
    bad = [k for k, v in plan["tensors"].items() if not isinstance(v, str)]
    if bad:
        raise PlanFileError(f"--plan {path}: tensor {bad[0]!r} has format {plan['tensors'][bad[0]]!r}, not a format "
                            "name such as 'asym4-g32'; the file is damaged. Write it again.")
    return plan


# the planner prices one projection of all of a layer's experts as one item (planner/spec.py); QuantConfig.format_for
# gives each expert tensor its group's format
EXPERT_GROUP = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj$")


def formats_from_plan(path: str | Path, cfg, model: str):
    """The QuantConfig whose per-tensor formats are the plan's (bf16 tensors are kept unquantized)."""
    plan = read_plan(path)
    if plan.get("model") not in (model, None):
        raise PlanFileError(f"--plan {path} was made for {plan['model']!r}, not {model!r}; plan this model first.")
    formats = {}
    for name, f in plan["tensors"].items():
        if not name.endswith(".weight") and not EXPERT_GROUP.match(name):
            raise PlanFileError(f"--plan {path}: {name!r} is neither a tensor name nor a layer's experts of one "
                                "projection (model.layers.N.mlp.experts.gate_proj); the file is damaged.")
        try:
            formats[name] = None if f == DENSE else WeightFormat.parse(f)
        except FormatError as e:
            raise PlanFileError(f"--plan {path}: tensor {name} has format {f!r}: {e}") from e
    return replace(cfg, tensor_formats=formats, predicted_kld=plan["predicted"].get("kld"))
