"""The suite catches a broken trainer: a fresh render whose train.py swallows SIGTERM fails the
SIGTERM scenario with a message naming the scenario and the trainer."""

from __future__ import annotations

import pytest

from tests.conformance import faults
from tests.conformance.harness import ConformanceFailure, make_subject, render_template

pytestmark = pytest.mark.slow

DEFECT = ("    import signal\n"
          "    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the defect under test\n")


def test_a_trainer_that_swallows_sigterm_fails_the_sigterm_scenario(
        tmp_path_factory, conformance_s3, strict_s3, mlflow_server):
    root = tmp_path_factory.mktemp("conformance-broken")
    trainer = render_template(root / "trainers" / "broken", slug="broken")
    train_py = trainer / "train.py"
    source = train_py.read_text(encoding="utf-8")
    entry = "def train(job: utils.Job) -> utils.JobResult:\n"
    assert source.count(entry) == 1, "the template's train() changed: update the injection"
    train_py.write_text(source.replace(entry, entry + DEFECT), encoding="utf-8")
    subject = make_subject("broken", trainer, s3=conformance_s3, strict_s3=strict_s3,
                           mlflow=mlflow_server, root=root, reported=False)

    with pytest.raises(ConformanceFailure) as failure:
        faults.sigterm(subject)

    message = str(failure.value)
    assert "scenario 'sigterm' failed for trainer 'broken'" in message, message
    assert "exit code 0, expected 143" in message, message
