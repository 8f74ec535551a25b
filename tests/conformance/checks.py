"""What every scenario checks, and the `Scenario` context that names scenario and trainer in
every failure and records the scenario's rows in the report."""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conformance.harness import (
    EPOCHS,
    EXIT_OK,
    ConformanceFailure,
    RunResult,
    Subject,
    find_secrets,
    produced_blobs,
)
from tests.conformance.report import REPORT, Row

TASK_TYPES = {"image_classification", "object_detection", "instance_segmentation",
              "semantic_segmentation", "pose_estimation"}


class Scenario:
    def __init__(self, subject: Subject, name: str) -> None:
        self.subject, self.name = subject, name
        self.rows: list[Row] = []

    def fail(self, message: str, result: RunResult | None = None) -> ConformanceFailure:
        text = (f"conformance scenario '{self.name}' failed for trainer '{self.subject.name}': "
                f"{message}")
        if result is not None:
            text += f"\n--- stderr tail ({result.scenario}) ---\n{result.tail()}"
        return ConformanceFailure(text)

    def check(self, condition: Any, message: str, result: RunResult | None = None) -> None:
        if not condition:
            raise self.fail(message, result)

    def record(self, result: RunResult) -> None:
        """Add the run's row to the report (marked failed if the scenario then fails)."""
        row = Row(self.subject.name, result.scenario, **result.delivery(), wall_s=result.wall_s,
                  exit_code=result.returncode)
        self.rows.append(row)
        if self.subject.reported:
            REPORT.add(row)


@contextmanager
def scenario(subject: Subject, name: str) -> Iterator[Scenario]:
    current = Scenario(subject, name)
    try:
        yield current
    except ConformanceFailure:
        _mark_failed(current)
        raise
    except Exception as exc:  # the harness itself broke: still say where
        _mark_failed(current)
        raise current.fail(f"{type(exc).__name__}: {exc}") from exc


def _mark_failed(current: Scenario) -> None:
    if not current.subject.reported:
        return
    if not current.rows:
        REPORT.add(Row(current.subject.name, current.name, 0, 0, 0, 0, None, None, False))
    for row in current.rows:
        row.passed = False
        REPORT.add(row)


# ---------------------------------------------------------------------------------------------
# Checks shared by the scenarios
# ---------------------------------------------------------------------------------------------

def check_no_secrets(sc: Scenario, result: RunResult) -> None:
    hits = find_secrets(produced_blobs(sc.subject, result))
    sc.check(not hits, f"secret values leaked ({result.scenario}): {'; '.join(hits)}")


def check_clean_exit(sc: Scenario, result: RunResult, expected: int) -> None:
    sc.check(result.returncode == expected,
             f"{result.scenario}: exit code {result.returncode}, expected {expected}", result)
    sc.check("Traceback" not in result.stderr,
             f"{result.scenario}: a traceback in the log (an expected condition must be one "
             "line)", result)


def check_completed(sc: Scenario, result: RunResult, *, epochs: int = EPOCHS,
                    first_epoch: int = 1) -> None:
    """Exit 0, every epoch reported once, `completed`, checkpoints and journal uploaded."""
    check_clean_exit(sc, result, EXIT_OK)
    statuses = result.statuses()
    sc.check(statuses[:1] == ["running"] and statuses[-1:] == ["completed"],
             f"{result.scenario}: statuses {statuses}, expected running ... completed", result)
    wanted = list(range(first_epoch, epochs + 1))
    sc.check(result.epochs() == wanted, f"{result.scenario}: training-metrics for epochs "
             f"{result.epochs()}, expected {wanted}", result)
    validated = sorted({b["epoch"] for b in result.routes("validation-results")})
    sc.check(validated == wanted, f"{result.scenario}: validation-results for epochs "
             f"{validated}, expected {wanted}", result)
    keys = set(sc.subject.job_keys(result.job_id))
    prefix = f"checkpoints/job-{result.job_id}/"
    missing = [prefix + n for n in ("last.pt", "best.pt", f"epoch-{epochs}.pt")
               if prefix + n not in keys]
    journal = f"artifacts/job-{result.job_id}/callbacks.jsonl"
    missing += [journal] if journal not in keys else []
    sc.check(not missing, f"{result.scenario}: not in the bucket: {', '.join(missing)}", result)
    if not missing:  # a completed job is never resumed: last.pt is its final weights-only file
        final = sc.subject.get(prefix + f"epoch-{epochs}.pt")
        sc.check(sc.subject.get(prefix + "last.pt") == final, f"{result.scenario}: the "
                 f"completed job's last.pt differs from its epoch-{epochs}.pt (weights only)",
                 result)
    sc.check(not (result.work_dir / "failure").exists(),
             f"{result.scenario}: a `failure` file after a completed job")
    sc.check((result.run_dir / "termination-log").read_text() == "",
             f"{result.scenario}: the termination log was written by a completed job")


def stored_calls(result: RunResult) -> list:
    assert result.backend is not None
    return [c for c in result.backend.calls if c.envelope.get("job_id") == result.job_id]


def check_delivered_in_order(sc: Scenario, result: RunResult) -> None:
    """Every event of the run stored once, in `seq` order, with the body the journal holds."""
    sent = [e["seq"] for e in result.events]
    mine = set(sent)
    stored = [c for c in stored_calls(result) if c.envelope.get("seq") in mine]
    seqs = [c.envelope["seq"] for c in stored]
    lost = sorted(mine - set(seqs))
    sc.check(not lost, f"{result.scenario}: events never stored by the backend: seq {lost} "
             f"({[e['route'] for e in result.events if e['seq'] in lost]})", result)
    sc.check(seqs == sent, f"{result.scenario}: events stored in the order {seqs}, "
             f"expected {sent}", result)
    journal = {e["seq"]: e["body"] for e in result.events}
    # Per-image results are journaled as {job_id, seq, after_seq, results} and sent as the list
    # of results, each given the backend's validation_result_id on delivery.
    differing = [c.envelope["seq"] for c in stored if not isinstance(c.body, list)
                 and json.dumps(c.body, sort_keys=True) != json.dumps(journal[c.envelope["seq"]],
                                                                      sort_keys=True)]
    sc.check(not differing, f"{result.scenario}: bodies differ from callbacks.jsonl for seq "
             f"{differing}")
    for call in stored:
        key = call.headers.get("Idempotency-Key")
        sc.check(bool(key) and key.startswith(f"{result.job_id}:")
                 and key.endswith(f":{call.envelope['seq']}"),
                 f"{result.scenario}: Idempotency-Key {key!r} for seq {call.envelope['seq']}")


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_event_shapes(sc: Scenario, result: RunResult) -> None:
    """The bodies carry the fields of the backend's request models (contract section 3)."""
    problems = []
    for body in result.routes("status"):
        missing = {"status", "error", "progress", "updated_at", "mlflow_experiment_id",
                   "mlflow_run_id", "job_id", "seq"} - set(body)
        if missing:
            problems.append(f"status {body.get('status')} lacks {sorted(missing)}")
    final = result.routes("status")[-1]
    if not isinstance(final.get("checkpoint_path"), str):
        problems.append("the completed status has no checkpoint_path (the best checkpoint)")
    for body in result.routes("training-metrics"):
        if not (isinstance(body.get("epoch"), int) and body.get("step") == body["epoch"]
                and isinstance(body.get("extra_metrics"), dict)
                and (body.get("loss") is None or _number(body["loss"]))):
            problems.append(f"training-metrics {body}")
    for body in result.routes("validation-results"):
        if not (body.get("task_type") in TASK_TYPES and isinstance(body.get("metrics"), dict)
                and isinstance(body.get("primary_metric_name"), str)
                and _number(body.get("primary_metric_value"))
                and isinstance(body.get("class_names"), list) and body["class_names"]):
            problems.append(f"validation-results {json.dumps(body)[:300]}")
    sc.check(not problems, f"{result.scenario}: bodies off the contract: "
             + "; ".join(problems[:5]))


def check_mlflow_run(sc: Scenario, result: RunResult, status: str) -> None:
    runs = sc.subject.mlflow_runs(result.job_id)
    sc.check(len(runs) >= 1, f"{result.scenario}: no MLflow run job-{result.job_id}")
    run = runs[0]
    sc.check(run.info.status == status, f"{result.scenario}: MLflow run ended "
             f"{run.info.status}, expected {status}")
    missing = {"job_id", "dataset_id", "framework", "model_name"} - set(run.data.tags)
    sc.check(not missing, f"{result.scenario}: MLflow run lacks tags {sorted(missing)}")


def last_uploaded_epoch(sc: Scenario, job_id: str) -> int | None:
    """The epoch of the bucket's `last.pt`, by the `epoch` the contract tags it with
    (x-amz-meta-epoch), provided that epoch's `epoch-N.pt` is in the bucket too: the contract
    uploads it first, so a `last.pt` whose epoch-N.pt is missing breaks the key order.

    Not bytes: mid-run, `last.pt` is the resumable checkpoint and `epoch-N.pt` its weights-only
    form (docs/checkpoints.md), so the two differ."""
    prefix = f"checkpoints/job-{job_id}/"
    epoch = sc.subject.metadata(prefix + "last.pt").get("epoch")
    if epoch is None or not epoch.isdigit():
        return None
    return int(epoch) if prefix + f"epoch-{epoch}.pt" in sc.subject.keys(prefix) else None
