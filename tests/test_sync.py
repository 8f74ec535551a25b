"""tools/sync.py against a miniature monorepo: the template, the tool, two rendered trainers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def render_trainer(repo: Path, slug: str) -> Path:
    subprocess.run([sys.executable, "-m", "copier", "copy", "--defaults", "--quiet",
                    "--data", f"slug={slug}", "template", f"trainers/{slug}"],
                   cwd=repo, check=True, capture_output=True, timeout=120)
    return repo / "trainers" / slug


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("pristine")
    shutil.copytree(REPO / "template", repo / "template",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tools", repo / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    render_trainer(repo, "alpha")
    render_trainer(repo, "beta-2")
    return repo


@pytest.fixture
def repo(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: no git, so the tool cannot lean on it."""
    copy = tmp_path / "repo"
    shutil.copytree(pristine, copy)
    return copy


def sync(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/sync.py", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)


def states(stdout: str) -> dict[str, str]:
    """{trainer: its status line's text} from the tool's one-line-per-trainer summary."""
    out = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition("  ")
        if rest and not line.startswith((" ", "-", "+", "@")):
            out[name.strip()] = rest.strip()
    return out


def snapshot(repo: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(repo).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (repo / "trainers").rglob("*") if p.is_file()}


def managed(repo: Path) -> list[str]:
    return yaml.safe_load((repo / "template" / "copier.yml").read_text())["_managed_files"]


def test_a_fresh_render_is_in_sync(repo: Path) -> None:
    result = sync(repo, "--check")
    assert result.returncode == 0, result.stdout
    assert states(result.stdout)["alpha"] == states(result.stdout)["beta-2"] == "in sync"


def test_utils_is_managed_and_byte_identical_across_trainers(repo: Path) -> None:
    assert "utils.py" in managed(repo)
    first = (repo / "trainers/alpha/utils.py").read_bytes()
    assert first == (repo / "trainers/beta-2/utils.py").read_bytes()
    assert first == (repo / "template/utils.py").read_bytes()
    assert b"python tools/sync.py" in first.split(b'"""')[0], "header must name the fix command"


def test_a_hand_edit_is_drift_with_a_diff_and_the_fix_command(repo: Path) -> None:
    copy = repo / "trainers/alpha/utils.py"
    copy.write_text(copy.read_text().replace("EXIT_CONFIG = 2", "EXIT_CONFIG = 7"))
    before = snapshot(repo)
    result = sync(repo, "--check")
    assert result.returncode == 1
    assert states(result.stdout)["alpha"] == "drifted"
    assert states(result.stdout)["beta-2"] == "in sync"
    assert "--- trainers/alpha/utils.py (in the trainer)" in result.stdout
    assert "+++ trainers/alpha/utils.py (rendered from template/)" in result.stdout
    assert "-EXIT_CONFIG = 7" in result.stdout and "+EXIT_CONFIG = 2" in result.stdout
    assert "edit the template, never the copy" in result.stdout
    assert result.stdout.rstrip().endswith("To fix, run: python tools/sync.py")
    assert snapshot(repo) == before, "--check must write nothing"


def test_sync_repairs_drift_then_check_passes(repo: Path) -> None:
    copy = repo / "trainers/alpha/utils.py"
    copy.write_text(copy.read_text() + "\n# local hack\n")
    fixed = sync(repo)
    assert fixed.returncode == 0, fixed.stdout
    assert states(fixed.stdout)["alpha"].startswith("drifted -> rewrote utils.py")
    assert copy.read_bytes() == (repo / "template/utils.py").read_bytes()
    assert sync(repo, "--check").returncode == 0


def test_a_second_sync_changes_nothing(repo: Path) -> None:
    assert sync(repo).returncode == 0
    before = snapshot(repo)
    again = sync(repo)
    assert again.returncode == 0 and "rewrote" not in again.stdout
    assert snapshot(repo) == before


def test_a_template_change_reaches_every_copy(repo: Path) -> None:
    template_utils = repo / "template/utils.py"
    template_utils.write_text(template_utils.read_text().replace(
        'CONTRACT_VERSION = "1"', 'CONTRACT_VERSION = "2"'))
    check = sync(repo, "--check")
    assert check.returncode == 1
    assert states(check.stdout)["alpha"] == states(check.stdout)["beta-2"] == "drifted"
    assert sync(repo).returncode == 0
    for slug in ("alpha", "beta-2"):
        assert 'CONTRACT_VERSION = "2"' in (repo / f"trainers/{slug}/utils.py").read_text()


def test_a_seed_file_edit_is_not_drift(repo: Path) -> None:
    train = repo / "trainers/alpha/train.py"
    train.write_text(train.read_text() + "\n# framework code goes here\n")
    (repo / "trainers/alpha/README.md").write_text("# our own README\n")
    assert sync(repo, "--check").returncode == 0


def test_a_crlf_only_difference_is_not_drift(repo: Path) -> None:
    copy = repo / "trainers/beta-2/utils.py"
    copy.write_bytes(copy.read_bytes().replace(b"\n", b"\r\n"))
    result = sync(repo, "--check")
    assert result.returncode == 0, result.stdout
    before = copy.read_bytes()
    assert sync(repo).returncode == 0 and copy.read_bytes() == before


def test_a_deleted_managed_file_is_reported_missing(repo: Path) -> None:
    (repo / "trainers/beta-2/utils.py").unlink()
    result = sync(repo, "--check")
    assert result.returncode == 1
    assert states(result.stdout)["beta-2"] == "missing"
    assert "trainers/beta-2/utils.py: missing" in result.stdout
    assert sync(repo).returncode == 0 and (repo / "trainers/beta-2/utils.py").is_file()


def test_an_unrenderable_trainer_is_a_render_error(repo: Path) -> None:
    answers = repo / "trainers/alpha/.copier-answers.yml"
    answers.write_text(answers.read_text().replace("slug: alpha", "slug: Not_Valid"))
    result = sync(repo, "--check")
    assert result.returncode == 2
    assert states(result.stdout)["alpha"].startswith("render error")
    assert 'slug "Not_Valid" must match ^[a-z0-9-]+$' in result.stdout
    assert states(result.stdout)["beta-2"] == "in sync"


def test_folders_without_answers_are_not_trainers(repo: Path) -> None:
    (repo / "trainers/notes").mkdir()
    (repo / "trainers/notes/utils.py").write_text("anything\n")
    result = sync(repo, "--check")
    assert result.returncode == 0 and "notes" not in result.stdout


def block(name: str, body: str = "") -> str:
    return (f"<!-- generated:{name} by `python tools/sync.py` -->\n{body}"
            f"<!-- /generated:{name} -->\n")


def test_a_trainer_readme_settings_table_is_regenerated_and_checked(repo: Path) -> None:
    readme = repo / "trainers/alpha/README.md"
    readme.write_text("# alpha\n\n" + block("settings-train", "| stale |\n") + "\nAfter.\n")
    check = sync(repo, "--check")
    assert check.returncode == 1, check.stdout
    assert "--- trainers/alpha/README.md (generated block 'settings-train', committed)" \
        in check.stdout
    assert "To fix, run: python tools/sync.py" in check.stdout
    assert sync(repo).returncode == 0
    text = readme.read_text()
    assert "| `EPOCHS` | int | `10` |" in text and "| stale |" not in text
    assert text.startswith("# alpha\n\n<!-- generated:settings-train") and text.endswith("After.\n")
    assert sync(repo, "--check").returncode == 0


def test_the_contract_tables_are_regenerated_wherever_they_live(repo: Path) -> None:
    (repo / "README.md").write_text("# monorepo\n\nSee docs/contract.md.\n")
    (repo / "docs").mkdir()
    contract = repo / "docs/contract.md"
    contract.write_text("# Contract\n\n" + block("contract-tables", "old\n")
                        + block("bench", "measured, left alone\n"))
    check = sync(repo, "--check")
    assert check.returncode == 1 and states(check.stdout)["docs/contract.md"] == "drifted"
    assert "docs/contract.md (generated block 'contract-tables', committed)" in check.stdout
    assert sync(repo).returncode == 0
    text = contract.read_text()
    assert "| `JOB_ID` | str |" in text and "| 143 |" in text and "old\n" not in text
    assert "measured, left alone\n" in text
    assert sync(repo, "--check").returncode == 0


def test_an_unknown_or_missing_generated_block_is_an_error(repo: Path) -> None:
    (repo / "README.md").write_text("# monorepo\n\n" + block("mystery", "x\n"))
    check = sync(repo, "--check")
    assert check.returncode == 2
    assert "README.md: unknown generated block 'mystery'" in check.stdout
    assert "no <!-- generated:contract-tables" in check.stdout
