"""Fixtures of the conformance suite: the trainers under test (every folder in trainers/ plus a
fresh render of template/), the servers they run against, each trainer's schedule of scenario
runs, and the report printed at the end (and written into a README on request)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.bad_input import CASES
from tests.conformance.harness import (
    FRESH,
    TRAINERS_DIR,
    StrictS3,
    Subject,
    discover_trainers,
    make_subject,
    render_template,
)
from tests.conformance.report import README_ENV, REPORT, ROW_ORDER, write_readme
from tests.conformance.schedule import Schedule
from tests.support.servers import MlflowServer, S3Server


@pytest.fixture(scope="session")
def conformance_s3() -> Iterator[S3Server]:
    """The suite's own S3 server (moto keeps the data per process: the scenarios that need
    an endpoint of their own open a second one onto the same buckets)."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def strict_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrictS3]:
    server = StrictS3(tmp_path_factory.mktemp("strict-s3"))
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _report_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    REPORT.path = tmp_path_factory.getbasetemp() / "conformance-report.md"
    REPORT.order = (*ROW_ORDER, *(case.name for case in CASES))


@pytest.fixture(scope="session", params=discover_trainers())
def subject(request: pytest.FixtureRequest, conformance_s3: S3Server, strict_s3: StrictS3,
            mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """One trainer under test, with its bucket, dataset and bad inputs uploaded."""
    name = request.param
    root = tmp_path_factory.mktemp(f"conformance-{name}")
    path = render_template(root / "trainers" / FRESH) if name == FRESH else TRAINERS_DIR / name
    return make_subject(name, path, s3=conformance_s3, strict_s3=strict_s3, mlflow=mlflow_server,
                        root=root)


@pytest.fixture(scope="session")
def schedule(subject: Subject, request: pytest.FixtureRequest) -> Iterator[Schedule]:
    """The trainer's selected scenarios (after -k / -m), started together in the background."""
    selected = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("subject") == subject.name and "scenario" in params:
            selected.add(params["scenario"])
    runs = Schedule(subject, selected)
    yield runs
    runs.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not REPORT.rows:
        return
    terminalreporter.section("conformance report")
    terminalreporter.write_line(REPORT.markdown())
    if REPORT.path is not None:
        terminalreporter.write_line(f"(written to {REPORT.path})")
    readme = os.environ.get(README_ENV)
    if readme:
        terminalreporter.write_line(write_readme(Path(readme)))
