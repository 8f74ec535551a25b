"""The MLflow Tracker of template/utils.py: a real tracking server, a dead one, a local store."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest

from tests.support.servers import closed_port_url


def unique_experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:10]}"


def mlflow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mlflow"]


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.slow
def test_run_is_named_tagged_and_logged(utils_module, mlflow_server, tmp_path):
    experiment = unique_experiment()
    tracker = utils_module.Tracker(mlflow_server.uri, experiment, tmp_path / "work")
    run_id = tracker.start("job-abc", {"job_id": "abc", "framework": "timm"})
    assert run_id
    tracker.log_params({"EPOCHS": 3, "MODEL_NAME": "resnet18", "UNSET": None})
    for epoch, value in ((1, 0.25), (2, 0.5)):
        tracker.log_metrics({"mAP@0.5": value, "mAP@0.5:0.95": value / 2, "train/loss": 1.0,
                             "not-a-number": float("nan")}, step=epoch)
    report = tmp_path / "report.json"
    report.write_text("{}")
    tracker.log_artifact(report, "reports")
    tracker.end("FINISHED", timeout=30)

    [run] = mlflow_server.runs(experiment)
    assert run.info.run_id == run_id and run.info.run_name == "job-abc"
    assert run.info.status == "FINISHED"
    assert run.data.tags["job_id"] == "abc" and run.data.tags["framework"] == "timm"
    assert run.data.params == {"EPOCHS": "3", "MODEL_NAME": "resnet18"}
    assert metric_history(mlflow_server.uri, run_id, "mAP_0.5") == [(1, 0.25), (2, 0.5)]
    assert metric_history(mlflow_server.uri, run_id, "mAP_0.5_0.95") == [(1, 0.125), (2, 0.25)]
    assert "train/loss" in run.data.metrics and "not-a-number" not in run.data.metrics
    from mlflow.tracking import MlflowClient

    artifacts = [a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(run_id,
                                                                                "reports")]
    assert artifacts == ["reports/report.json"]


@pytest.mark.parametrize(("name", "expected"), [
    ("mAP@0.5", "mAP_0.5"),
    ("mAP@0.5:0.95", "mAP_0.5_0.95"),
    ("val/top-5 acc", "val/top-5 acc"),
    ("loss(box)", "loss_box"),
    ("@@@", "metric"),
])
def test_metric_names_are_made_valid_for_mlflow(utils_module, name, expected):
    assert utils_module.mlflow_metric_name(name) == expected


def test_dead_tracking_server_costs_one_warning_and_is_fast(utils_module, tmp_path, caplog):
    tracker = utils_module.Tracker(closed_port_url(), unique_experiment(), tmp_path / "work")
    threads_before = mlflow_threads()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert tracker.start("job-x", {}) is None
        tracker.log_params({"EPOCHS": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.end("FINISHED", timeout=5)
    assert time.monotonic() - started < 5
    assert tracker.disabled_reason and "unreachable" in tracker.disabled_reason
    assert len(caplog.records) == 1 and "tracking is off" in caplog.records[0].getMessage()
    assert mlflow_threads() == threads_before  # nothing was queued for a dead server


def test_default_local_store_lives_in_the_work_dir(utils_module, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    experiment = unique_experiment()
    tracker = utils_module.Tracker(None, experiment, work_dir)
    assert tracker.start("job-local", {"job_id": "local"})
    tracker.log_metrics({"loss": 0.5}, step=1)
    artifact = tmp_path / "plot.txt"
    artifact.write_text("a plot")
    tracker.log_artifact(artifact)
    tracker.end("FINISHED", timeout=30)

    assert tracker.disabled_reason is None
    assert list(cwd.iterdir()) == []  # no ./mlruns, no ./mlflow.db
    assert (work_dir / "mlflow.db").is_file()
    assert [p.name for p in (work_dir / "mlruns").rglob("plot.txt")] == ["plot.txt"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work_dir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.5}


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_a_new_experiment_on_a_given_store_keeps_its_artifacts_in_the_work_dir(
        utils_module, tmp_path, monkeypatch, store):
    """MLFLOW_TRACKING_URI names a database or file store (no server) and the experiment is new:
    MLflow's default would put the artifacts in ./mlruns of the current folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores else
    uri = (f"sqlite:///{tmp_path / 'store.db'}" if store == "sqlite"
           else (tmp_path / "file-store").as_uri())
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    tracker = utils_module.Tracker(uri, unique_experiment(), work_dir)
    assert tracker.start("job-given", {"job_id": "given"})
    artifact = tmp_path / "plot.txt"
    artifact.write_text("a plot")
    tracker.log_artifact(artifact)
    tracker.end("FINISHED", timeout=30)

    assert tracker.disabled_reason is None
    assert list(cwd.iterdir()) == []
    assert [p.name for p in (work_dir / "mlruns").rglob("plot.txt")] == ["plot.txt"]


def test_a_job_that_tracks_nothing_has_a_null_tracker(utils_module, tmp_path):
    """predict.py has no MLflow run: the job's tracker is the null one, whose calls do nothing
    (no `if tracker` in Job), and the status carries no MLflow ids."""
    seen = []

    def work(job):
        seen.append(job.tracker)
        job.log_metrics({"loss": 1.0}, step=1)
        job.upload_artifacts([])
        return None

    environ = {"STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(tmp_path / "bucket"),
               "WORK_DIR": str(tmp_path / "work"), "CHECKPOINT_PATH": "c.pt",
               "INPUT_PATH": "i.jpg"}
    code = utils_module.run_job("predict", utils_module.PREDICT_SETTINGS, work,
                                framework="test", argv=[], environ=environ)

    assert code == utils_module.EXIT_OK
    assert isinstance(seen[0], utils_module.NullTracker)
    journal = tmp_path / "work" / utils_module.JOURNAL_NAME
    statuses = [json.loads(line)["body"] for line in journal.read_text().splitlines()]
    assert [s["status"] for s in statuses] == ["running", "completed"]
    assert all(s["mlflow_run_id"] is None and s["mlflow_experiment_id"] is None
               for s in statuses)
