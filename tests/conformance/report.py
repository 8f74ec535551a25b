"""The suite's report: per trainer, one row per scenario run, printed at the end of the session
(tests/conformance/conftest.py), kept as Markdown beside the session's temporary files, and
written into a Markdown file between markers when CONFORMANCE_REPORT names it:

    CONFORMANCE_REPORT=docs/conformance.md python -m pytest tests/conformance

replaces what lies between `<!-- generated:reliability ... -->` and
`<!-- /generated:reliability -->` in docs/conformance.md with the table (the markers stay).
The report names the commit and date it was measured on.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path

HEALTHY = "healthy"  # the scenario every wall time is compared with
COLUMNS = ("scenario", "events sent", "delivered", "duplicated", "lost",
           "wall time vs healthy", "exit code", "result")
README_ENV = "CONFORMANCE_REPORT"
README_BLOCK = re.compile(r"(<!-- generated:reliability\b.*?-->\n?)(.*?)"
                          r"(<!-- /generated:reliability -->)", re.DOTALL)
# The order of the rows (a scenario's runs finish in any order: two run at a time).
ROW_ORDER = ("healthy", "backend-503-then-down", "backend-hung", "backend-401",
             "backend-cancel", "s3-outage", "mlflow-unreachable", "mlflow-killed", "sigterm",
             "sigterm-resume", "sigkill", "sigkill-restart", "backend-redirect", "backend-trickle",
             "double-launch", "double-launch-refused")


@dataclasses.dataclass
class Row:
    trainer: str
    scenario: str
    sent: int
    delivered: int
    duplicated: int
    lost: int
    wall_s: float | None
    exit_code: int | None
    passed: bool = True

    def cells(self, healthy_wall_s: float | None) -> list[str]:
        ratio = "" if self.wall_s is None or not healthy_wall_s else (
            f"{self.wall_s / healthy_wall_s:.2f}")
        return [self.scenario, str(self.sent), str(self.delivered), str(self.duplicated),
                str(self.lost), ratio, "" if self.exit_code is None else str(self.exit_code),
                "pass" if self.passed else "FAIL"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cores} CPU cores ({cpu}), {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def commit() -> str:
    """The commit measured: `git describe`'s short hash, `-dirty` with uncommitted changes."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"],
                               cwd=Path(__file__).parent, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "an unknown commit (no git)"
    return f"commit {found.stdout.strip()}" if found.returncode == 0 else "an unknown commit"


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.path: Path | None = None
        self.started = time.monotonic()
        self.order: tuple[str, ...] = ROW_ORDER  # conftest adds the bad inputs
        self._lock = threading.RLock()

    def add(self, row: Row) -> None:
        """Add (or replace) a scenario's row; called from the scenarios' worker threads."""
        with self._lock:
            self.rows = [r for r in self.rows
                         if (r.trainer, r.scenario) != (row.trainer, row.scenario)] + [row]
            if self.path is not None:
                self.path.write_text(self.markdown(), encoding="utf-8")

    def _order(self, row: Row) -> tuple[int, str]:
        known = row.scenario in self.order
        return (self.order.index(row.scenario) if known else len(self.order), "" if known else
                row.scenario)

    def markdown(self) -> str:
        with self._lock:
            rows_by_trainer: dict[str, list[Row]] = {}
            for row in self.rows:
                rows_by_trainer.setdefault(row.trainer, []).append(row)
        lines = [f"Conformance report of {commit()}, measured "
                 f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}; suite "
                 f"wall time {time.monotonic() - self.started:.0f} s. "
                 "Wall time is the whole process's, start to exit, against the trainer's "
                 "healthy run (two runs share the CPUs at a time).", ""]
        for trainer in sorted(rows_by_trainer):
            rows = sorted(rows_by_trainer[trainer], key=self._order)
            lines += [f"**{trainer}**", "", "| " + " | ".join(COLUMNS) + " |",
                      "|" + "---|" * len(COLUMNS)]
            healthy = next((r.wall_s for r in rows if r.scenario == HEALTHY), None)
            lines += ["| " + " | ".join(r.cells(healthy)) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)


REPORT = Report()


def write_readme(readme: Path, report: Report = REPORT) -> str:
    """Replace the generated:reliability block of `readme` with the report; say what was done."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as exc:
        return f"{README_ENV}: cannot read {readme}: {exc}"
    match = README_BLOCK.search(text)
    if match is None:
        return (f"{README_ENV}: {readme} has no '<!-- generated:reliability ... -->' ... "
                "'<!-- /generated:reliability -->' block: nothing written")
    opening = match.group(1) if match.group(1).endswith("\n") else match.group(1) + "\n"
    body = (f"<!-- Generated by `{README_ENV}={readme.as_posix()} python -m pytest "
            f"tests/conformance`; edits here are overwritten. -->\n\n"
            f"{report.markdown().rstrip()}\n\n")
    updated = text[:match.start()] + opening + body + match.group(3) + text[match.end():]
    readme.write_text(updated, encoding="utf-8")
    return f"{README_ENV}: the reliability table is written into {readme}"
