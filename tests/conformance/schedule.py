"""Running one trainer's scenarios two at a time, in the background.

Most of a scenario is a subprocess that imports torch and MLflow or trains on one CPU thread, so
two runs side by side use the suite's two cores and halve the wall time. Every scenario is
independent of the others (its own backend, job id, work dir; the S3 outage and the SIGKILL
restart get an S3 endpoint of their own), except that the healthy run is everyone's baseline:
it goes first, and a scenario that compares against it waits for it.

The tests only wait for their scenario's outcome: `Schedule.result(name)` returns what the
scenario returned or raises what it raised (a ConformanceFailure naming scenario and trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tests.conformance import bad_input, faults
from tests.conformance.harness import Subject, tree_state

WORKERS = 2  # runs side by side: the CI runner's cores
# Written in a trainer folder by a developer's tools while the suite runs (ruff, pytest, mypy;
# bytecode of a test run: the jobs themselves run with PYTHONDONTWRITEBYTECODE=1).
TOOL_CACHES = {".ruff_cache", ".pytest_cache", ".mypy_cache", "__pycache__"}


def _fault(subject: Subject, healthy: Future | None,
           scenario: Callable[[Subject], Any]) -> Callable[[], Any]:
    def job() -> Any:
        if healthy is not None:
            with contextlib.suppress(Exception):  # a failed baseline fails its own test
                healthy.result()
        return scenario(subject)
    return job


def _bad_input(subject: Subject, case: bad_input.BadInput) -> Callable[[], Any]:
    return lambda: bad_input.run_bad_input(subject, case)


class Schedule:
    """The selected scenarios of one subject, submitted in order to WORKERS threads."""

    def __init__(self, subject: Subject, selected: Iterable[str], workers: int = WORKERS):
        self.subject = subject
        selected = set(selected)
        self.trainer_dir_before = tree_state(subject.spec.path)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"conformance-{subject.name}")
        self.futures: dict[str, Future] = {}
        faults_wanted = [name for name in faults.FAULTS if name in selected]
        healthy = None
        if faults_wanted:  # the baseline first: every fault scenario compares with it
            healthy = self.futures[faults.HEALTHY] = self._pool.submit(faults.baseline, subject)
        # The bad inputs next: short, and needing no baseline, they fill the second worker
        # while the healthy run goes.
        for case in bad_input.CASES:
            if case.name in selected:
                self.futures[case.name] = self._pool.submit(_bad_input(subject, case))
        for name in faults_wanted:
            if name != faults.HEALTHY:
                self.futures[name] = self._pool.submit(
                    _fault(subject, healthy, faults.FAULTS[name]))

    def result(self, name: str) -> Any:
        if name not in self.futures:  # not selected when the schedule was made: run it now
            job = (_bad_input(self.subject, bad_input.CASE_BY_NAME[name])
                   if name in bad_input.CASE_BY_NAME else
                   _fault(self.subject, self.futures.get(faults.HEALTHY), faults.FAULTS[name]))
            self.futures[name] = self._pool.submit(job)
        return self.futures[name].result()

    def wait_all(self) -> None:
        for future in list(self.futures.values()):
            with contextlib.suppress(Exception):
                future.result()

    def trainer_dir_changes(self) -> list[str]:
        """Files of the trainer folder (every run's cwd) added, removed or changed so far."""
        after = tree_state(self.subject.spec.path)
        before = self.trainer_dir_before
        return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                      and not TOOL_CACHES.intersection(k.split("/")))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
