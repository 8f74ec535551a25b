"""run_job of template/utils.py end to end: real S3, backend and MLflow servers on loopback."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.servers import TEMPLATE_UTILS, closed_port_url, wait_until

SECRET_VALUES = ("test-secret-key", "test-access-key", "test-token")


def run(utils, environ, work, argv=()):
    return utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test-framework",
                         argv=list(argv), environ=environ)


def train_env(job_env, **extra) -> dict[str, str]:
    return {**job_env, "DATASET_ID": "ds-1", "MODEL_NAME": "tiny", **extra}


def failure_file(env) -> Path:
    return Path(env["WORK_DIR"]) / "failure"


def write_checkpoint(utils, job, content: bytes) -> Path:
    target = job.work_dir / "last.pt"
    with utils.atomic_path(target) as tmp:
        tmp.write_bytes(content)
    return target


def accuracy_result(utils, value: float):
    return utils.ValidationResult(
        task_type="image_classification", metrics={"accuracy": value, "f1_score": value},
        primary_metric_name="accuracy", primary_metric_value=value, overall_loss=1 - value,
        class_names=["cat", "dog"])


@pytest.mark.slow
def test_successful_job_reports_everything(utils_module, job_env, backend, s3, mlflow_server):
    env = train_env(job_env, EPOCHS="2", MLFLOW_EXPERIMENT_NAME="lifecycle-success")
    utils = utils_module

    def work(job):
        for epoch in (1, 2):
            job.start_epoch()
            checkpoint = write_checkpoint(utils, job, f"weights-{epoch}".encode())
            job.end_epoch(epoch, job.cfg.epochs, utils.TrainingMetrics(loss=1.0 / epoch),
                          accuracy_result(utils, 0.5 * epoch), checkpoint=checkpoint,
                          is_best=epoch == 1)
        return utils.JobResult(metrics={"accuracy": 1.0}, checkpoint_path=job.best_checkpoint_uri)

    assert run(utils, env, work) == utils.EXIT_OK

    assert backend.statuses() == ["running", "completed"]
    completed = backend.bodies("status")[-1]
    prefix = f"s3://{s3.bucket}/checkpoints/job-job-1"
    assert completed["metrics"] == {"accuracy": 1.0}
    assert completed["checkpoint_path"] == f"{prefix}/best.pt"
    assert completed["progress"] == 100.0 and completed["error"] is None
    assert completed["mlflow_run_id"] and completed["mlflow_experiment_id"]

    metrics = backend.bodies("training-metrics")
    assert [(m["epoch"], m["step"], m["loss"]) for m in metrics] == [(1, 1, 1.0), (2, 2, 0.5)]
    assert [m["checkpoint_path"] for m in metrics] == [f"{prefix}/epoch-1.pt",
                                                       f"{prefix}/epoch-2.pt"]
    assert metrics[0]["extra_metrics"]["total_epochs"] == 2
    validations = backend.bodies("validation-results")
    assert [v["is_best"] for v in validations] == [True, False]
    assert validations[0]["checkpoint_path"] == f"{prefix}/best.pt"
    assert validations[1]["class_names"] == ["cat", "dog"]
    assert [c.body["seq"] for c in backend.calls] == list(range(1, 7))

    assert s3.keys("checkpoints/") == [f"checkpoints/job-job-1/{name}" for name in
                                       ("best.pt", "epoch-1.pt", "epoch-2.pt", "last.pt")]
    assert s3.get_bytes("checkpoints/job-job-1/best.pt") == b"weights-1"
    assert s3.get_bytes("checkpoints/job-job-1/last.pt") == b"weights-2"

    [mlflow_run] = mlflow_server.runs("lifecycle-success")
    assert mlflow_run.info.run_name == "job-job-1" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_id == completed["mlflow_run_id"]
    assert {k: mlflow_run.data.tags[k] for k in ("job_id", "dataset_id", "framework",
                                                  "model_name")} == {
        "job_id": "job-1", "dataset_id": "ds-1", "framework": "test-framework",
        "model_name": "tiny"}
    params = mlflow_run.data.params
    assert params["EPOCHS"] == "2" and params["DATASET_ID"] == "ds-1"
    for secret_name in ("MINIO_SECRET_KEY", "MINIO_ACCESS_KEY", "INTERNAL_AUTH_TOKEN",
                        "MLFLOW_TRACKING_URI"):
        assert secret_name not in params
    assert not any(secret in value for value in params.values() for secret in SECRET_VALUES)
    assert mlflow_run.data.metrics["val_accuracy"] == 1.0
    assert not failure_file(env).exists()
    journal = (Path(env["WORK_DIR"]) / "callbacks.jsonl").read_text().splitlines()
    assert len(journal) == 6
    uploaded = s3.get_bytes("artifacts/job-job-1/callbacks.jsonl").decode().splitlines()
    assert uploaded == journal  # the journal goes with the artifacts, terminal status included


def test_trainer_error_fails_the_job_with_one_line(utils_module, job_env, backend, tmp_path):
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    env = train_env(job_env, TERMINATION_LOG=str(termination_log))

    def work(job):
        raise utils_module.DatasetError("dataset ds-1 has no val split;\n  add val/ or valid/")

    code = run(utils_module, env, work)
    assert code == utils_module.EXIT_DATA and "data" in utils_module.EXIT_CODES[code]
    line = "dataset ds-1 has no val split; add val/ or valid/"
    assert backend.statuses() == ["running", "failed"]
    assert backend.bodies("status")[-1]["error"] == line
    assert failure_file(env).read_text() == line + "\n"
    assert termination_log.read_text() == line + "\n"


def test_missing_termination_log_is_not_created(utils_module, job_env, tmp_path):
    absent = tmp_path / "no-such-dir" / "termination-log"
    env = train_env(job_env, TERMINATION_LOG=str(absent))

    def work(job):
        raise utils_module.StorageError("bucket 'x' does not exist")

    assert run(utils_module, env, work) == utils_module.EXIT_DATA
    assert failure_file(env).is_file()
    assert not absent.exists() and not absent.parent.exists()


def test_unexpected_exception_exits_1_with_traceback(utils_module, job_env, backend, caplog):
    env = train_env(job_env)

    def work(job):
        return {}["missing-key"]

    with caplog.at_level(logging.ERROR, logger="trainer"):
        assert run(utils_module, env, work) == utils_module.EXIT_UNEXPECTED
    error = backend.bodies("status")[-1]["error"]
    assert backend.statuses() == ["running", "failed"]
    assert error.startswith("unexpected error: KeyError") and "\n" not in error
    assert any(record.exc_info for record in caplog.records)  # a bug keeps its traceback
    assert failure_file(env).read_text().startswith("unexpected error: KeyError")


def test_config_error_is_reported_before_any_work(utils_module, job_env, backend):
    env = train_env(job_env, EPOCHS="ten", BATCH_SIZE="0")
    called = []
    code = run(utils_module, env, called.append)
    assert code == utils_module.EXIT_CONFIG and called == []
    assert backend.statuses() == ["failed"]
    error = backend.bodies("status")[0]["error"]
    assert "EPOCHS='ten' is not an integer" in error and "BATCH_SIZE='0'" in error
    assert backend.calls[0].headers["X-Internal-Auth"] == "test-token"
    assert "EPOCHS='ten'" in failure_file(env).read_text()


def test_unknown_flag_is_reported_like_a_bad_variable(utils_module, job_env, backend):
    code = run(utils_module, train_env(job_env), lambda job: None, ["--epoks", "3"])
    assert code == utils_module.EXIT_CONFIG
    assert backend.statuses() == ["failed"]
    assert "unrecognized arguments: --epoks 3" in backend.bodies("status")[0]["error"]


def test_flags_are_parsed_by_run_job(utils_module, job_env, backend):
    seen = {}

    def work(job):
        seen["epochs"] = job.cfg.epochs

    assert run(utils_module, train_env(job_env, EPOCHS="3"), work, ["--epochs", "7"]) == 0
    assert seen == {"epochs": 7}


def test_cancel_request_stops_after_the_epoch_and_uploads_last(utils_module, job_env, backend,
                                                               s3):
    backend.cancel_after("training-metrics", 2)
    epochs_run = []

    def work(job):
        # Far more epochs than the cancel needs: the answer arrives asynchronously, and a loaded
        # machine may take a while to deliver epoch 2's metrics.
        for epoch in range(1, 1001):
            epochs_run.append(epoch)
            checkpoint = write_checkpoint(utils_module, job, f"weights-{epoch}".encode())
            job.end_epoch(epoch, 1000, utils_module.TrainingMetrics(loss=1.0),
                          checkpoint=checkpoint)
            time.sleep(0.05)

    code = run(utils_module, train_env(job_env, EPOCHS="1000"), work)
    assert code == utils_module.EXIT_CANCELLED
    assert backend.statuses() == ["running", "cancelled"]
    assert 2 <= len(epochs_run) < 1000
    last = s3.get_bytes("checkpoints/job-job-1/last.pt")
    assert last == f"weights-{epochs_run[-1]}".encode()


def test_seed_names_are_bound_to_the_running_job(utils_module, job_env, backend, s3, tmp_path):
    with pytest.raises(RuntimeError, match="no job is running"):
        utils_module.notify_status("running")
    report = tmp_path / "report.json"
    report.write_text("{}")
    uris = []

    def work(job):
        utils_module.send_training_metrics(1, loss=0.25, extra_metrics={"lr_decay": 0.9})
        uris.append(utils_module.upload_artifact(report, job.artifact_key("report.json")))

    assert run(utils_module, train_env(job_env), work) == 0
    assert backend.bodies("training-metrics")[0]["loss"] == 0.25
    assert uris == [f"s3://{s3.bucket}/artifacts/job-job-1/report.json"]
    assert s3.get_bytes("artifacts/job-job-1/report.json") == b"{}"


def test_dead_backend_and_tracker_do_not_fail_or_stall_the_job(utils_module, job_env, backend,
                                                               caplog):
    backend.set_down(True)
    env = train_env(job_env, CALLBACK_FLUSH_S="3", MLFLOW_TRACKING_URI=closed_port_url())
    started = time.monotonic()

    def work(job):
        for epoch in (1, 2, 3):
            job.end_epoch(epoch, 3, utils_module.TrainingMetrics(loss=1.0))

    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert run(utils_module, env, work) == utils_module.EXIT_OK
    assert time.monotonic() - started < 10  # bounded by CALLBACK_FLUSH_S, not by retries
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tracking is off" in w for w in warnings)
    assert any("not delivered" in w for w in warnings)  # given up, and said so
    journal = (Path(env["WORK_DIR"]) / "callbacks.jsonl").read_text().splitlines()
    statuses = [json.loads(line)["body"].get("status") for line in journal]
    assert statuses == ["running", None, None, None, "completed"]


SIGTERM_SCRIPT = textwrap.dedent("""
    import importlib.util, sys, time

    spec = importlib.util.spec_from_file_location("utils", sys.argv[1])
    utils = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = utils
    spec.loader.exec_module(utils)

    def work(job):
        checkpoint = job.work_dir / "last.pt"
        checkpoint.write_bytes(b"weights-1")
        job.end_epoch(1, 100, utils.TrainingMetrics(loss=1.0), checkpoint=checkpoint)
        (job.work_dir / "started").write_text("epoch 1 done")
        while True:
            time.sleep(0.1)

    sys.exit(utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test-framework",
                           argv=[]))
""")


@pytest.mark.slow
def test_sigterm_cancels_uploads_last_and_exits_143(job_env, backend, s3, mlflow_server,
                                                    tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SIGTERM_SCRIPT)
    env = train_env(job_env, SHUTDOWN_GRACE_S="20", MLFLOW_EXPERIMENT_NAME="lifecycle-sigterm")
    started_marker = Path(env["WORK_DIR"]) / "started"
    process = subprocess.Popen([sys.executable, str(script), str(TEMPLATE_UTILS)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: started_marker.exists() or process.poll() is not None, timeout=60)
        assert started_marker.exists(), process.communicate(timeout=30)[1]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert backend.statuses() == ["running", "cancelled"]
    assert backend.bodies("status")[-1]["error"] == "received SIGTERM"
    assert s3.get_bytes("checkpoints/job-job-1/last.pt") == b"weights-1"
    [mlflow_run] = mlflow_server.runs("lifecycle-sigterm")
    assert mlflow_run.info.status == "KILLED"
    assert "Traceback" not in stderr
    assert not failure_file(env).exists()  # a cancellation is not a failure
    for secret in SECRET_VALUES:
        assert secret not in stderr
