"""The committed reports (docs/conformance.md, docs/benchmarks.md) describe today's repository:
their rows name today's trainers and scenarios, and each names the commit and date it was
measured on. A stale one fails here; its own command regenerates it (named in the file)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conformance.bad_input import CASES
from tests.conformance.faults import FAULTS
from tests.conformance.harness import FRESH
from tests.conformance.report import ROW_ORDER

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE, BENCHMARKS = REPO / "docs" / "conformance.md", REPO / "docs" / "benchmarks.md"
MEASURED_ON = re.compile(r"\b20\d\d-\d\d-\d\d\b.*\bcommit [0-9a-f]{7,}|"
                         r"\bcommit [0-9a-f]{7,}.*\b20\d\d-\d\d-\d\d\b")


def block(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    found = re.search(rf"<!-- generated:{name}\b[^\n]*-->\n(.*?)<!-- /generated:{name} -->",
                      text, re.S)
    assert found, f"{path.relative_to(REPO)} has no generated:{name} block"
    return found[1]


def trainers() -> set[str]:
    listed = subprocess.run([sys.executable, str(REPO / "tools/list_trainers.py")],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    return {entry["slug"] for entry in json.loads(listed)["include"]}


def conformance_rows(text: str) -> dict[str, set[str]]:
    """{trainer: {scenario, ...}} of the report's per-trainer tables."""
    rows: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.fullmatch(r"\*\*(.+)\*\*", line.strip())
        if heading:
            current = rows.setdefault(heading[1], set())
        elif current is not None and line.startswith("| ") and not line.startswith(
                ("| scenario ", "|---")):
            current.add(line.split("|")[1].strip())
    return rows


def test_the_conformance_report_has_a_row_per_trainer_and_scenario() -> None:
    report = block(CONFORMANCE, "reliability")
    fix = ("regenerate it: CONFORMANCE_REPORT=docs/conformance.md python -m pytest "
           "tests/conformance")
    assert MEASURED_ON.search(report.split("\n\n**")[0]), (
        f"docs/conformance.md does not name the commit and date it was measured on; {fix}")
    expected_scenarios = {*FAULTS, *ROW_ORDER, *(case.name for case in CASES)}
    rows = conformance_rows(report)
    assert set(rows) == trainers() | {FRESH}, (
        f"docs/conformance.md reports trainers {sorted(rows)}, today's are "
        f"{sorted(trainers() | {FRESH})}; {fix}")
    for trainer, scenarios in rows.items():
        assert scenarios == expected_scenarios, (
            f"docs/conformance.md, {trainer}: missing {sorted(expected_scenarios - scenarios)}, "
            f"no longer a scenario {sorted(scenarios - expected_scenarios)}; {fix}")


def test_the_benchmarks_report_names_its_commit_and_every_trainer() -> None:
    report = block(BENCHMARKS, "bench")
    fix = "regenerate it: python tools/bench.py --repeat 7 --markdown docs/benchmarks.md"
    assert MEASURED_ON.search(report.splitlines()[0]), (
        f"docs/benchmarks.md does not name the commit and date it was measured on; {fix}")
    started = {m[1] for m in re.finditer(r"^\| start-up: (\S+) \|", report, re.M)}
    assert started == trainers(), (
        f"docs/benchmarks.md times the start-up of {sorted(started)}, today's trainers are "
        f"{sorted(trainers())}; {fix}")


def test_the_conformance_rows_are_read_from_the_report_format() -> None:
    """The parser above, on the format report.py writes (so a passing test means something)."""
    from tests.conformance.report import Report, Row

    report = Report()
    report.add(Row("alpha", "healthy", 8, 8, 0, 0, 1.0, 0))
    report.add(Row("alpha", "sigkill-restart", 6, 6, 0, 0, 1.1, 0))
    report.add(Row("beta", "healthy", 8, 8, 0, 0, 1.0, 0))
    text = report.markdown()
    assert conformance_rows(text) == {"alpha": {"healthy", "sigkill-restart"},
                                      "beta": {"healthy"}}
    assert MEASURED_ON.search(text.split("\n\n**")[0]), text.splitlines()[0]
