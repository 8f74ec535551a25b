"""run_job over a slow, flaky S3 path: what instant loopback uploads cannot show.

A test checkpoint crosses a direct loopback link in a millisecond, so a job that reports
`completed` before its uploads finished, exits on cancel without waiting for `last.pt`, or gives
up on the first refused upload still passed every test. Here the job reaches the S3 server
through `SlowLink` (tests/support/servers.py): ~2 s per checkpoint, and a refusal on demand that
only the trainer's own retry gets past. Each test is a few seconds; each fails on its bug.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.servers import TEMPLATE_UTILS, SlowLink, closed_port_url, wait_until

RATE = 256 * 1024  # bytes/s through the link
WEIGHTS = os.urandom(2 * RATE)  # ~2 s to upload: far longer than reporting a status takes
LAST = "checkpoints/job-job-1/last.pt"


@pytest.fixture
def slow_link(s3):
    link = SlowLink(s3.port, rate=RATE)
    yield link
    link.close()


@pytest.fixture
def slow_env(tmp_path: Path, s3, backend, slow_link) -> dict[str, str]:
    """A job whose storage is behind the slow link; MLflow unreachable (off after one try)."""
    return {**clean_environ(), **s3.env(), "MINIO_ENDPOINT": slow_link.endpoint,
            **backend.env("job-1"), "MLFLOW_TRACKING_URI": closed_port_url(),
            "WORK_DIR": str(tmp_path / "work"), "DATASET_ID": "ds-1", "MODEL_NAME": "tiny",
            "EPOCHS": "1", "SHUTDOWN_GRACE_S": "20", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run(utils, environ, work):
    return utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test-framework",
                         argv=[], environ=environ)


def save_epoch(utils, job, *, total_epochs: int = 1) -> None:
    """One epoch's checkpoint, handed to end_epoch: uploaded in the background."""
    target = job.work_dir / "last.pt"
    with utils.atomic_path(target) as tmp:
        tmp.write_bytes(WEIGHTS)
    job.end_epoch(1, total_epochs, utils.TrainingMetrics(loss=1.0), checkpoint=target)


def test_completed_is_reported_only_after_the_uploads_are_in_the_bucket(
        utils_module, slow_env, backend, s3):
    started = time.monotonic()
    code = run(utils_module, slow_env, lambda job: save_epoch(utils_module, job))
    assert code == utils_module.EXIT_OK
    assert backend.statuses() == ["running", "completed"]
    # run_job has returned, so `completed` was reported: the checkpoint must be there already.
    assert s3.get_bytes(LAST) == WEIGHTS
    assert time.monotonic() - started >= 1.5  # the link really was slow


def test_an_upload_refused_once_is_retried_within_the_window(utils_module, slow_env, backend,
                                                             s3, slow_link, caplog):
    slow_link.fail_next(1)  # the SDK does not retry a 409: only the uploader's retry helps
    with caplog.at_level(logging.WARNING, logger="trainer"):
        code = run(utils_module, slow_env, lambda job: save_epoch(utils_module, job))
    assert code == utils_module.EXIT_OK, caplog.text
    assert [line.split()[0] for line in slow_link.failed] == ["PUT"]
    assert any("failed, retrying" in r.getMessage() for r in caplog.records)
    assert backend.statuses() == ["running", "completed"]
    assert s3.get_bytes(LAST) == WEIGHTS


def test_cancel_waits_for_last_pt_before_reporting_cancelled(utils_module, slow_env, backend,
                                                             s3):
    def work(job):
        job.cancel_requested.set()  # what the platform's {"cancel": true} answer sets
        save_epoch(utils_module, job, total_epochs=100)  # uploads, then stops the job

    code = run(utils_module, slow_env, work)
    assert code == utils_module.EXIT_CANCELLED
    assert backend.statuses() == ["running", "cancelled"]
    assert s3.get_bytes(LAST) == WEIGHTS  # uploaded before the job reported and returned


SIGTERM_SCRIPT = textwrap.dedent("""
    import importlib.util, os, sys, time

    spec = importlib.util.spec_from_file_location("utils", sys.argv[1])
    utils = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = utils
    spec.loader.exec_module(utils)

    def work(job):
        checkpoint = job.work_dir / "last.pt"
        checkpoint.write_bytes(os.urandom(int(sys.argv[2])))
        job.end_epoch(1, 100, utils.TrainingMetrics(loss=1.0), checkpoint=checkpoint)
        (job.work_dir / "started").write_text("last.pt is uploading")
        while True:
            time.sleep(0.05)

    sys.exit(utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test-framework",
                           argv=[]))
""")


def test_sigterm_waits_for_last_pt_before_exiting(slow_env, backend, s3, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SIGTERM_SCRIPT)
    started_marker = Path(slow_env["WORK_DIR"]) / "started"
    process = subprocess.Popen([sys.executable, str(script), str(TEMPLATE_UTILS),
                                str(len(WEIGHTS))], env=slow_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: started_marker.exists() or process.poll() is not None, timeout=30)
        assert started_marker.exists(), process.communicate(timeout=30)[1]
        process.send_signal(signal.SIGTERM)  # while last.pt is still on its way
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert backend.statuses() == ["running", "cancelled"]
    local = (Path(slow_env["WORK_DIR"]) / "last.pt").read_bytes()
    assert s3.get_bytes(LAST) == local
