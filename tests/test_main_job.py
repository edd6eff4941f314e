"""The README's first command (run by .ci/run before the tests) wrote a complete report."""

import json
import os
from pathlib import Path

import pytest

from .conftest import in_ci


def test_the_readme_main_job_wrote_its_report():
    folder = os.environ.get("TIGHTFIT_MAIN_JOB_OUTPUT")
    if not folder:
        if in_ci():
            pytest.fail("CI=true but TIGHTFIT_MAIN_JOB_OUTPUT is unset: .ci/run runs the README's main job first")
        pytest.skip("the README's main job was not run (TIGHTFIT_MAIN_JOB_OUTPUT unset)")
    out = Path(folder)
    for name in ("report.md", "fit.json", "fit.png", "plan.json", "artifact/manifest.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "fit.json").read_text())
    m, p = res["measured"], res["plan"]["predicted"]
    assert 0 <= m["kld"] < 0.5 and m["decode_tok_s"] > 0 and m["bits_per_weight"] < 16
    assert res["plan"]["memory_bytes"]["weights"] <= 280e6
    report = (out / "report.md").read_text()
    assert f"{p['kld']:.4g}" in report and "| decode tokens/s |" in report
    assert not (out.parent / f".{out.name}.stages").exists()


def test_ci_runs_the_readme_commands_verbatim():
    import re

    root = Path(__file__).parent.parent
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S)]
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert len(commands) >= 2 and commands[0] in ci and commands[1] in ci
    assert ci.index(commands[0]) < ci.index(commands[1])  # the main job first
