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
