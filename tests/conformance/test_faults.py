"""Faults: nothing lost, training unaffected (issue 5). One real run per scenario and trainer
(two for SIGTERM and SIGKILL: the interrupted job and its restart), run two at a time by
schedule.py; each test waits for its scenario."""

from __future__ import annotations

import pytest

from tests.conformance import faults

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", list(faults.FAULTS))
def test_fault(subject, schedule, scenario):
    result = schedule.result(scenario)
    if scenario == faults.HEALTHY:  # the baseline's own checks (the others check themselves)
        faults.check_healthy(subject, result)
