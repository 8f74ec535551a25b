"""Bad input: one clear line, reported, nothing lost (issue 5)."""

from __future__ import annotations

import pytest

from tests.conformance.bad_input import CASE_BY_NAME, CASES, check_bad_input
from tests.conformance.harness import ConformanceFailure

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", [case.name for case in CASES])
def test_bad_input(subject, schedule, scenario):
    check_bad_input(subject, CASE_BY_NAME[scenario], schedule.result(scenario))


def test_runs_leave_the_trainer_folder_alone(subject, schedule):
    """Every run's cwd is the trainer folder: no run of the session may write there."""
    schedule.wait_all()
    changes = schedule.trainer_dir_changes()
    if changes:
        raise ConformanceFailure(
            f"conformance scenario 'trainer-folder' failed for trainer '{subject.name}': the "
            f"runs (cwd = {subject.spec.path}) changed files there: {changes[:10]}")
