"""The READMEs' commands work as written, in a fresh clone after the README's set-up.

A fenced block that a person is meant to run on the sample is marked by the comment line
`<!-- readme-test: quick -->` (seconds: run in the normal suite) or `<!-- readme-test: slow -->`
(it trains: marked slow) just before it. Each README's blocks run in order with bash, from the
README's own folder, in a copy of the repository's files (what a clone has: tracked and
not-ignored files) whose `.venv` is this interpreter's environment, so nothing is written into
the checkout. Afterwards the copy's `git status` must be clean: a command's outputs go under
ignored folders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", *sorted(REPO.glob("trainers/*/README.md"))]
MARKED_BLOCK = re.compile(r"^<!-- readme-test: (?P<kind>quick|slow) -->\n```(?:bash|sh)\n"
                          r"(?P<commands>.*?)^```", re.M | re.S)
VENV = Path(sys.prefix)


def marked_blocks(readme: Path, kind: str) -> list[str]:
    return [m["commands"] for m in MARKED_BLOCK.finditer(readme.read_text(encoding="utf-8"))
            if m["kind"] == kind]


def readme_id(readme: Path) -> str:
    return readme.relative_to(REPO).as_posix()


def fresh_clone(dest: Path) -> Path:
    """The files a clone has (tracked, or new and not ignored), with a git history of one commit
    so that `git status` afterwards shows what the commands left outside ignored folders."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(VENV)  # the README's set-up, already done
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run([*git, *command], cwd=dest, check=True, capture_output=True)
    return dest


def shell_env(home: Path) -> dict[str, str]:
    """A person's shell with the venv active: no platform variables, a HOME of its own."""
    keep = ("LANG", "LC_ALL", "TERM", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "PATH": f"{VENV / 'bin'}{os.pathsep}/usr/bin:/bin",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def run_blocks(clone: Path, readme: Path, blocks: list[str], tmp_path: Path,
               timeout: int) -> None:
    folder = clone / readme.parent.relative_to(REPO)
    env = shell_env(tmp_path / "home")
    for commands in blocks:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, (
            f"{readme_id(readme)}: this block failed (exit {result.returncode}):\n{commands}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def left_outside_ignored_folders(clone: Path) -> list[str]:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    return status.splitlines()


@pytest.fixture(scope="module")
def quick_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


def test_every_readme_marks_the_commands_it_runs() -> None:
    root = REPO / "README.md"
    assert marked_blocks(root, "quick") and marked_blocks(root, "slow")
    for readme in READMES[1:]:
        assert marked_blocks(readme, "slow"), f"{readme_id(readme)} marks no block to run"
    template = (REPO / "template/README.md.jinja").read_text(encoding="utf-8")
    assert "<!-- readme-test: slow -->" in template, "a new trainer's README marks its commands"


@pytest.mark.parametrize("readme", [r for r in READMES if marked_blocks(r, "quick")],
                         ids=readme_id)
def test_quick_readme_commands_run_as_written(readme: Path, quick_clone: Path,
                                              tmp_path: Path) -> None:
    run_blocks(quick_clone, readme, marked_blocks(readme, "quick"), tmp_path, timeout=300)
    assert left_outside_ignored_folders(quick_clone) == []


def demo_table_paths(readme: Path) -> list[str]:
    """The paths of the root README's outputs table, `<id>` as a wildcard, braces expanded."""
    text = readme.read_text(encoding="utf-8")
    table = text[text.index("| what | where |"):].split("\n\n", 1)[0].splitlines()[2:]
    paths = []
    for row in table:
        what, where = row.strip("|").split("|")[:2]
        if "if it failed" in what:
            continue
        for path in re.findall(r"`([^`]+)`", where):
            path = path.replace("<id>", "*")
            braces = re.search(r"\{([^}]*)\}", path)
            options = braces[1].split(",") if braces else [""]
            for option in options:
                expanded = path[:braces.start()] + option + path[braces.end():] if braces else path
                paths.append(expanded.replace("epoch-N", "epoch-*"))
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("readme", READMES, ids=readme_id)
def test_training_readme_commands_run_as_written(readme: Path, tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "clone")
    run_blocks(clone, readme, marked_blocks(readme, "slow"), tmp_path, timeout=900)
    assert left_outside_ignored_folders(clone) == []
    if readme != REPO / "README.md":
        return
    demo = clone / "trainers" / "ultralytics"
    missing = [p for p in demo_table_paths(readme) if not list(demo.glob(p))]
    assert not missing, f"README.md's outputs table names paths the demo did not write: {missing}"
    mlflow_ui = re.search(r"^cd (\S+) && \S*mlflow ui --backend-store-uri (\S+)$",
                          readme.read_text(encoding="utf-8"), re.M)
    assert mlflow_ui, "README.md shows how to open the demo's MLflow store"
    folder, uri = clone / mlflow_ui[1], mlflow_ui[2]
    probe = ("import sys, mlflow; client = mlflow.MlflowClient(sys.argv[1]); "
             "print(*[r.info.run_name for e in client.search_experiments() "
             "for r in client.search_runs([e.experiment_id])])")
    runs = subprocess.run([sys.executable, "-c", probe, uri], cwd=folder, capture_output=True,
                          text=True, timeout=120, env=shell_env(tmp_path / "home"))
    assert runs.returncode == 0, runs.stderr[-2000:]
    assert re.search(r"\bjob-\S+", runs.stdout), f"no job run in {uri}: {runs.stdout!r}"


def test_the_root_readme_stays_a_newcomers_page() -> None:
    """At most 250 lines; the contract's tables and the reports live in docs/."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md is over 250 lines: move details to docs/"
    assert not re.search(r"^<!-- generated:", text, re.M), "generated tables belong in docs/"
