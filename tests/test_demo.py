"""The first thing anyone runs, `pixi run train` (here its pip twin), visibly learns.

The root task trains the Ultralytics trainer's default demo on its bundled sample, on CPU: its
last validation must reach mAP@0.5 >= 0.5 (the README's promise), "(best)" must mark only the
epochs that improved, and Ultralytics' chatter must stay out of the log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.servers import REPO

BUCKET = REPO / "trainers" / "ultralytics" / ".sample"  # LOCAL_STORAGE_ROOT of the demo task


@pytest.mark.slow  # ~1.5 minutes on 2 CPU cores
def test_the_default_demo_learns(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "tools/run_task.py", "--env", f"WORK_DIR={work}", "train"],
        cwd=REPO, env=clean_environ(), capture_output=True, text=True, timeout=900)
    events = [json.loads(line) for line in (work / "callbacks.jsonl").open(encoding="utf-8")]
    job_id = events[0]["body"]["job_id"]
    for prefix in ("checkpoints", "artifacts"):  # the demo's outputs in the ignored .sample/
        shutil.rmtree(BUCKET / prefix / f"job-{job_id}", ignore_errors=True)
    assert result.returncode == 0, result.stderr[-5000:]

    validations = [e["body"] for e in events if e["route"] == "validation-results"]
    assert [v["epoch"] for v in validations] == list(range(1, 31))
    last = validations[-1]["metrics"]["mAP@0.5"]
    assert last >= 0.5, [round(v["metrics"]["mAP@0.5"], 3) for v in validations]

    values = [v["primary_metric_value"] for v in validations]
    improved = [i == 0 or value > max(values[:i]) for i, value in enumerate(values)]
    assert [v["is_best"] for v in validations] == improved
    best_lines = [line for line in result.stderr.splitlines() if line.endswith("(best)")]
    assert len(best_lines) == sum(improved)

    assert {p.name for p in (work / "checkpoints").glob("*.pt")} == {"best.pt", "last.pt"}
    assert f"best checkpoint: {work / 'checkpoints' / 'best.pt'} (" in result.stdout

    log = result.stderr
    assert f"train job {job_id} (ultralytics; no JOB_ID" in log
    assert "Creating new Ultralytics Settings" not in log and "engine/trainer:" not in log
    assert "\x1b[3" not in log  # no colour codes: stderr is a pipe here
