"""tools/gpu_smoke.py: its help, its refusal without CUDA, its plan, and its plumbing on the CPU.

No GPU is available where this project is built, so the command's GPU run cannot be tested here;
what can be is: `--help`, the one-line exit 2 without CUDA (GPUs hidden, so this holds on a GPU
machine too), the plan of every trainer's steps (`--dry-run`), and the whole orchestration on the
CPU for one trainer (`--device cpu`, slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tools" / "gpu_smoke.py"


def smoke(*args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SMOKE), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def trainers() -> list[str]:
    listed = subprocess.run([sys.executable, "tools/list_trainers.py"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return [entry["slug"] for entry in json.loads(listed.stdout)["include"]]


def test_help_explains_the_command_instantly() -> None:
    started = time.monotonic()
    result = smoke("--help")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5  # no torch import for --help
    for words in ("--dry-run", "--device", "--trainer", "torchrun --nproc_per_node 1",
                  "TensorRT", "mixed precision", "Exit: 0", "2 no CUDA"):
        assert words in result.stdout, words


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    result = smoke("--work-dir", str(tmp_path / "smoke"), env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "no CUDA device" in result.stderr
    assert not (tmp_path / "smoke").exists()  # nothing was run or written


def test_dry_run_plans_every_step_of_every_trainer(tmp_path: Path) -> None:
    result = smoke("--dry-run", "--work-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    plan: dict[str, dict[str, str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("# "):
            current = plan.setdefault(line.split()[1], {})
        else:
            step, _, rest = line.partition(" ")
            current[step] = rest.strip()
    assert sorted(plan) == sorted(trainers())
    for slug, steps in plan.items():
        assert list(steps)[:5] == ["sample", "train", "evaluate", "predict", "export-onnx"], slug
        assert "EPOCHS=2 " in steps["train"] and "DEVICE=cuda " in steps["train"]
        assert f"CHECKPOINT_PATH=checkpoints/job-smoke-{slug}/last.pt" in steps["evaluate"]
        assert "EXPORT_FORMAT=onnx" in steps["export-onnx"]
        assert all("STORAGE_TYPE=local" in cmd for name, cmd in steps.items()
                   if name != "sample" and not cmd.startswith("skipped: "))
    assert "AMP=auto" in plan["timm"]["train"] and "AMP=true" in plan["ultralytics"]["train"]
    ddp = plan["timm"]["torchrun"]
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 train.py" in ddp
    assert "[log must say 'backend nccl']" in ddp
    assert "export-engine" in plan["ultralytics"]  # TensorRT: run, or skipped saying why


@pytest.mark.slow
def test_cpu_run_of_one_trainer_passes_every_step_and_prints_the_table(tmp_path: Path) -> None:
    folder = REPO / "trainers" / "pytorch"
    before = set(folder.rglob("*"))
    result = smoke("--device", "cpu", "--epochs", "1", "--trainer", "pytorch",
                   "--work-dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split(None, 3) for line in result.stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("pytorch", s) for s in (
        "sample", "train", "evaluate", "predict", "export-onnx")]
    assert all(r[3].startswith("ok") for r in rows), result.stdout
    assert "max |diff|" in rows[-1][3]  # the export's numeric check, read from its metadata
    assert (tmp_path / "pytorch" / "bucket" / "checkpoints" / "job-smoke-pytorch"
            / "last.pt").is_file()
    assert set(folder.rglob("*")) == before  # nothing written into the trainer's folder
