"""Every pixi task also runs through the pip path (tools/run_task.py), so the two cannot diverge.

Each task of every manifest must be claimed below: run here through run_task.py, or (the root
`test` task) run by .ci/run itself. A new task with no claim fails this module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINERS = sorted(p.parent for p in REPO.glob("trainers/*/.copier-answers.yml"))


def tasks_of(manifest: Path) -> list[str]:
    with open(manifest, "rb") as fh:
        return sorted(tomllib.load(fh).get("tasks", {}))


ALL_TASKS = [(REPO / "pixi.toml", t) for t in tasks_of(REPO / "pixi.toml")] + [
    (trainer / "pixi.toml", t) for trainer in TRAINERS for t in tasks_of(trainer / "pixi.toml")]


def task_id(item: tuple[Path, str]) -> str:
    manifest, task = item
    where = "root" if manifest.parent == REPO else manifest.parent.relative_to(REPO).as_posix()
    return f"{where}:{task}"


def run_task(manifest: Path, task: str, *overrides: str, timeout: int = 900,
             ) -> subprocess.CompletedProcess:
    env_args = [arg for o in overrides for arg in ("--env", o)]
    return subprocess.run([sys.executable, str(REPO / "tools/run_task.py"), "--manifest-path",
                           str(manifest), *env_args, task], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def check_ci_runs_the_root_test_task(manifest: Path, tmp_path: Path) -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "tools/run_task.py test" in ci, ".ci/run must run the root `test` task"


def check_bench_smoke_runs_the_task(manifest: Path, tmp_path: Path) -> None:
    test = (REPO / "tests" / "test_bench.py").read_text()
    assert '"tools/run_task.py", "bench"' in test, "tests/test_bench.py must run the `bench` task"


def check_runs(manifest: Path, task: str, tmp_path: Path) -> subprocess.CompletedProcess:
    result = run_task(manifest, task)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def check_training_demo(manifest: Path, tmp_path: Path, task: str = "train") -> None:
    work = tmp_path / "work"
    result = run_task(manifest, task, "EPOCHS=1", f"WORK_DIR={work}", "JOB_ID=demo")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "callbacks.jsonl").is_file() and (work / "mlflow.db").is_file()
    assert "completed" in (work / "callbacks.jsonl").read_text()


def check_sync_in_a_copy(manifest: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".work", ".sample", "__pycache__", ".venv", ".git")
    for name in ("template", "tools", "trainers"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)
    shutil.copy(REPO / "pixi.toml", copy / "pixi.toml")
    copy_utils = next(copy.glob("trainers/*/utils.py"))
    copy_utils.write_text(copy_utils.read_text() + "# drift\n")
    result = subprocess.run([sys.executable, str(copy / "tools/run_task.py"), "sync"],
                            cwd=copy, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert copy_utils.read_bytes() == (copy / "template/utils.py").read_bytes()


def claim(manifest: Path, task: str):
    if manifest == REPO / "pixi.toml":
        return {"test": check_ci_runs_the_root_test_task,
                "train": check_training_demo,
                "bench": check_bench_smoke_runs_the_task,
                "sync": check_sync_in_a_copy,
                "sync-check": lambda m, p: check_runs(m, "sync-check", p),
                "lint": lambda m, p: check_runs(m, "lint", p)}.get(task)
    if task.startswith("train-"):  # another task's demo (the Hugging Face trainer's)
        return lambda m, p: check_training_demo(m, p, task)
    if task.startswith("sample-"):
        return lambda m, p: check_runs(m, task, p)
    return {"train": check_training_demo,
            "sample": lambda m, p: check_runs(m, "sample", p),
            "test": lambda m, p: check_runs(m, "test", p)}.get(task)


@pytest.mark.slow
@pytest.mark.parametrize("item", ALL_TASKS, ids=task_id)
def test_pixi_task_runs_through_the_pip_path(item: tuple[Path, str], tmp_path: Path) -> None:
    manifest, task = item
    check = claim(manifest, task)
    assert check is not None, (f"{task_id(item)} has no pip-path twin: add it to claim() in "
                               "tests/test_pixi_tasks.py")
    check(manifest, tmp_path)


def test_run_task_follows_a_nested_pixi_run(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pixi.toml").write_text(
        '[tasks]\nfirst = "echo first >> ../order"\n'
        'second = { cmd = "echo $WHO >> ../order", depends-on = ["first"], '
        'env = { WHO = "second" } }\n')
    (tmp_path / "pixi.toml").write_text(
        '[tasks]\nouter = "pixi run --manifest-path inner/pixi.toml second"\n')
    result = subprocess.run([sys.executable, str(REPO / "tools/run_task.py"), "--manifest-path",
                             str(tmp_path / "pixi.toml"), "outer"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "order").read_text().split() == ["first", "second"]


def test_run_task_names_an_unknown_task() -> None:
    result = run_task(REPO / "pixi.toml", "no-such-task")
    assert result.returncode == 2 and "has no task 'no-such-task'" in result.stderr


def run_task_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools/run_task.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_run_task_uses_the_manifest_nearest_the_current_folder(tmp_path: Path) -> None:
    deep = tmp_path / "trainers" / "alpha" / "sub"
    deep.mkdir(parents=True)
    (tmp_path / "pixi.toml").write_text('[tasks]\nwho = "echo root > $OUT"\n')
    (tmp_path / "trainers" / "alpha" / "pixi.toml").write_text(
        '[tasks]\nwho = { cmd = "echo alpha > $OUT", description = "alpha\'s own" }\n')
    out = tmp_path / "out"
    assert run_task_in(deep, "--env", f"OUT={out}", "who").returncode == 0
    assert out.read_text().strip() == "alpha", "the nearest pixi.toml is the trainer's"
    assert run_task_in(deep, "--env", f"OUT={out}", "--manifest-path",
                       str(tmp_path / "pixi.toml"), "who").returncode == 0
    assert out.read_text().strip() == "root", "--manifest-path wins"
    nowhere = run_task_in(tmp_path.parent, "who")
    assert nowhere.returncode == 2 and "no pixi.toml in" in nowhere.stderr


def test_run_task_without_a_task_lists_the_tasks() -> None:
    listing = run_task_in(REPO / "trainers" / "timm")
    assert listing.returncode == 0, listing.stderr
    assert "trainers/timm/pixi.toml" in listing.stdout
    timm_train = next(line for line in listing.stdout.splitlines() if line.split()[:1] == ["train"])
    assert "timm" in timm_train, "each task is listed with its description"
    assert "usage" not in listing.stderr and "required" not in listing.stderr


def test_run_task_passes_arguments_on_without_repeating_a_flag(tmp_path: Path) -> None:
    (tmp_path / "pixi.toml").write_text(
        '[tasks]\ntest = "python -m pytest -q -p no:cacheprovider"\n')
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n\n"
                                          "def test_other():\n    pass\n")
    result = run_task_in(tmp_path, "test", "--", "-q", "-k", "other", "test_one.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 deselected" in result.stdout, "pytest's closing line is still shown"
