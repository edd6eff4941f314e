"""Fuzz every reader of outside data at volume: the hypothesis targets of tests/test_fuzz.py and
tests/test_chat_template.py run with N random
examples each (instead of CI's fixed 40), under coverage; writes the outcome counts per target (a result, or each
typed error by name; anything else fails the target) and the line coverage of each reader's module.

    python bench/fuzz.py --examples 10000 -o bench/results/fuzz.json     # ~1 h on 2 cores
    python bench/fuzz.py --examples 300 --targets "gguf or chat"         # a quick look
    python bench/fuzz.py --examples 2000 --targets http -o F --append    # add or redo targets in F

Needs the bench extra's `coverage` (pip install -e .[bench]).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# hypothesis target (a test in tests/test_fuzz.py, or the file FILES names) -> the reader modules it exercises
TARGETS = {
    "test_damaged_gguf_files_give_a_result_or_a_typed_error": ["tightfit/models/gguf_file.py",
                                                               "tightfit/models/lazy.py"],
    "test_damaged_manifests_give_a_result_or_a_typed_error": ["tightfit/quant/artifact.py",
                                                              "tightfit/runtime/load.py",
                                                              "tightfit/formats/weight.py"],
    "test_damaged_plans_give_a_result_or_a_typed_error": ["tightfit/planner/plan_io.py"],
    "test_fuzzed_request_bodies_get_an_answer_or_an_openai_4xx": ["tightfit/server/app.py",
                                                                  "tightfit/server/schema.py",
                                                                  "tightfit/server/structured.py",
                                                                  "tightfit/server/ops.py"],
    "test_damaged_config_json_gives_a_plan_spec_or_a_typed_error": ["tightfit/planner/spec.py"],
    "test_damaged_hugging_face_folders_give_a_result_or_a_typed_error": ["tightfit/models/hf.py",
                                                                         "tightfit/models/lazy.py"],
    "test_random_chat_templates_give_a_text_or_a_typed_error": ["tightfit/chat_template.py"],
}


FILES = {"test_random_chat_templates_give_a_text_or_a_typed_error": "tests/test_chat_template.py"}  # else test_fuzz


def run_target(test: str, examples: int, log: Path, data_file: Path) -> dict:
    env = dict(os.environ, TIGHTFIT_FUZZ_EXAMPLES=str(examples), TIGHTFIT_FUZZ_LOG=str(log))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "coverage", "run", "--branch", f"--data-file={data_file}",
                        "--source=tightfit", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--show-capture=no",
                        "-W", "ignore", f"{FILES.get(test, 'tests/test_fuzz.py')}::{test}"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    return {"passed": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
            "failure": None if r.returncode == 0 else (r.stdout + r.stderr)[-8000:]}


def coverage_of(data_file: Path, modules: list[str]) -> dict:
    import coverage

    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    out = {}
    for m in modules:
        _, statements, _, missing, _ = cov.analysis2(str(ROOT / m))
        out[m] = {"statements": len(statements), "covered": len(statements) - len(missing),
                  "percent": round(100 * (1 - len(missing) / max(len(statements), 1)), 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000, help="random examples per target (default 10000)")
    ap.add_argument("--targets", default="", help="only targets whose name contains one of these words "
                                                  "('gguf or chat')")
    ap.add_argument("-o", "--output", type=Path, help="JSON to write")
    ap.add_argument("--append", action="store_true", help="update the targets run in an existing --output")
    args = ap.parse_args()
    words = [w.strip() for w in args.targets.split(" or ") if w.strip()]
    chosen = [t for t in TARGETS if not words or any(w in t for w in words)]
    result = {"targets": {}}
    if args.append and args.output and args.output.exists():
        result = json.loads(args.output.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for test in chosen:
            log, data_file = Path(tmp) / f"{test}.jsonl", Path(tmp) / f"{test}.coverage"
            print(f"{test}: {args.examples} examples ...", file=sys.stderr, flush=True)
            row = {"examples": args.examples, **run_target(test, args.examples, log, data_file)}
            counts = collections.Counter()
            if log.exists():
                for line in log.read_text().splitlines():
                    rec = json.loads(line)
                    counts[f"{rec['target']}: {rec['outcome']}"] += 1
            row["outcomes"] = dict(counts.most_common())
            row["inputs"] = sum(c for k, c in counts.items() if not k.startswith("load_runtime"))
            row["coverage"] = coverage_of(data_file, TARGETS[test]) if data_file.exists() else {}
            result["targets"][test] = row
            print(json.dumps({test: {k: row[k] for k in ("passed", "seconds", "outcomes")}}, indent=1),
                  file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0 if all(r["passed"] for r in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
