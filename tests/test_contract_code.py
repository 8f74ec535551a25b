"""Platform code is single-sourced in the vendored contract, and trainers follow its conventions.

Static checks over the trainers' own files (and the template's seeds): what the contract already
provides is called, not copied; one way to declare a setting, to log, to read a variable that is
not a setting, and to end a job script.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.contract import contract
from tests.support.servers import REPO

TRAINERS = sorted(p for p in (REPO / "trainers").iterdir() if (p / "utils.py").is_file())
JOB_SCRIPTS = ("train.py", "evaluate.py", "predict.py", "export.py")


def own_files() -> list[Path]:
    """Every Python file a trainer (or the template) owns: not the vendored utils.py, not tests."""
    files = [p for trainer in TRAINERS for p in trainer.glob("*.py") if p.name != "utils.py"]
    return files + [p for p in (REPO / "template").glob("*.py*") if p.name != "utils.py"]


def hits(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.M)
    return [f"{p.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for p in own_files() for text in [p.read_text(encoding="utf-8")]
            for m in regex.finditer(text)]


@pytest.mark.parametrize(("what", "pattern"), [
    ("a classification_metrics of its own", r"^def classification_metrics\b"),
    ("a sha256 helper of its own", r"^def sha256\b|hashlib\.sha256"),
    ("a metadata.json envelope built by hand", r"\"metadata_version\""),
    ("the export upload tail", r"artifact_key\(f\"export/"),
])
def test_no_trainer_copies_what_the_contract_provides(what: str, pattern: str) -> None:
    assert hits(pattern) == [], f"{what} (use utils.py's)"


def test_environment_variables_are_settings_or_declared_outside_env() -> None:
    """Reads go through parse_settings or utils.outside_env; writes (setting a library's
    variable before importing it) are allowed."""
    reads = hits(r"os\.getenv\(|environ\.get\(|environ\[[^\]]+\](?!\s*=[^=])|\bin (os\.)?environ\b")
    assert reads == []
    settings = {s.name for table in (contract.PLATFORM_SETTINGS, contract.TRAIN_SETTINGS,
                                     contract.EVALUATE_SETTINGS, contract.PREDICT_SETTINGS,
                                     contract.EXPORT_SETTINGS) for s in table}
    assert settings.isdisjoint(contract.OUTSIDE_ENV)
    used = set(re.findall(r"outside_env\(\"([A-Z_]+)\"", "".join(
        p.read_text(encoding="utf-8") for p in own_files())))
    assert used <= set(contract.OUTSIDE_ENV)


def test_one_spelling_for_a_setting_and_one_logger_idiom() -> None:
    assert hits(r"\b_s\(|= utils\.Setting\b|\bS\(\"") == []
    assert hits(r"utils\.log\.|getLogger\(\"trainer\"\)|getLogger\(__name__\)") == []
    loggers = hits(r"^log = logging\.getLogger\(.*\)$")
    assert loggers and all(line.endswith('log = logging.getLogger(f"trainer.{__name__}")')
                           for line in loggers)


@pytest.mark.parametrize("trainer", TRAINERS, ids=[t.name for t in TRAINERS])
def test_every_job_script_ends_through_exit_process(trainer: Path) -> None:
    for script in JOB_SCRIPTS:
        path = trainer / script
        if path.is_file():
            tail = path.read_text(encoding="utf-8").rstrip().splitlines()[-2:]
            assert tail == ['if __name__ == "__main__":', "    utils.exit_process(main())"], path
