"""Identity of events, MLflow as the platform's UI reads it, provenance, the published callback API.

The end-to-end test runs the PyTorch trainer's train.py and then evaluate.py under one JOB_ID, as a
platform may, on local storage with the recording backend and a SQLite MLflow store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.contract import contract
from tests.support.servers import (
    CALLBACK_API,
    REPO,
    RecordingBackend,
    callback_body_problems,
    closed_port_url,
)

PYTORCH = REPO / "trainers" / "pytorch"
JOB = "77"
ROUTES = {"/status": "patch", "/training-metrics": "post", "/validation-results": "post",
          "/logs": "post", "/validation-image-results": "post"}


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PYTORCH / script)], cwd=PYTORCH, env=env,
                          capture_output=True, text=True, timeout=600)


def keys(backend: RecordingBackend) -> list[str]:
    return [call.headers["Idempotency-Key"] for call in backend.calls + backend.duplicates]


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    root = tmp_path / "bucket"
    subprocess.run([sys.executable, str(PYTORCH / "sample_data.py"), str(root), "--train", "6",
                    "--val", "3"], check=True, timeout=120, capture_output=True)
    return root


@pytest.mark.slow
def test_train_then_evaluate_under_one_job_id(tmp_path: Path, bucket: Path,
                                              backend: RecordingBackend) -> None:
    store = tmp_path / "mlflow.db"
    env = {**clean_environ(), **backend.env(JOB), "STORAGE_TYPE": "local",
           "LOCAL_STORAGE_ROOT": str(bucket), "DATASET_ID": "sample",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_EXPERIMENT_NAME": "job_{JOB_ID}",
           "EPOCHS": "2", "BATCH_SIZE": "8", "NUM_WORKERS": "0", "DEVICE": "cpu",
           "PRETRAINED": "false", "IMAGE_SIZE": "32", "IMAGE_REF": "registry/trainer@sha256:abc",
           "TRAINER_REVISION": "0123abc"}

    trained = run_script("train.py", {**env, "WORK_DIR": str(tmp_path / "train")})
    assert trained.returncode == 0, trained.stderr[-3000:]
    train_keys = set(keys(backend))
    # A fresh container: evaluate's own work dir, so its seq starts again at 1.
    evaluated = run_script("evaluate.py", {**env, "WORK_DIR": str(tmp_path / "evaluate"),
                                           "CHECKPOINT_PATH": f"checkpoints/job-{JOB}/best.pt"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    eval_keys = set(keys(backend)) - train_keys
    assert eval_keys and not eval_keys & train_keys
    assert len(keys(backend)) == len(set(keys(backend))) == len(backend.calls)
    assert all(key.startswith(f"{JOB}:train:") for key in train_keys)
    assert all(key.startswith(f"{JOB}:evaluate:") for key in eval_keys)
    validations = backend.bodies("validation-results")
    assert [(v["source"], v["split"]) for v in validations] == [
        ("train", "val"), ("train", "val"), ("evaluate", "val")]
    assert backend.violations == []  # every body valid in schemas/callback-api.openapi.json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(f"job_{JOB}")
    assert experiment is not None
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"job-{JOB}", f"eval-{JOB}"}
    train_run = runs[f"job-{JOB}"]
    metrics = train_run.data.metrics
    assert {"train_loss", "val_loss", "best_val_loss", "best_val_accuracy"} <= set(metrics)
    assert not [name for name in metrics if "/" in name]  # one naming, not two
    history = client.get_metric_history(train_run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert metrics["best_val_loss"] == min(m.value for m in history)

    tags = train_run.data.tags
    assert tags["image_ref"] == "registry/trainer@sha256:abc"
    assert tags["source_revision"] == "0123abc"
    assert tags["framework_version"] == contract.installed_version("torch")
    assert tags["dataset_etag"]
    assert runs[f"eval-{JOB}"].data.tags["dataset_etag"] == tags["dataset_etag"]

    best = contract.load_torch_checkpoint(bucket / "checkpoints" / f"job-{JOB}" / "best.pt")
    provenance = best["provenance"]
    assert {k: provenance[k] for k in ("image_ref", "source_revision", "framework_version",
                                       "dataset_etag")} == {
        k: tags[k] for k in ("image_ref", "source_revision", "framework_version", "dataset_etag")}


def test_a_resumed_attempt_resends_what_was_not_delivered_under_the_same_keys(
        utils_module, backend: RecordingBackend, tmp_path: Path) -> None:
    env = {**clean_environ(), **backend.env("job-r"), "STORAGE_TYPE": "local",
           "LOCAL_STORAGE_ROOT": str(tmp_path / "bucket"), "DATASET_ID": "ds",
           "MLFLOW_TRACKING_URI": closed_port_url(), "WORK_DIR": str(tmp_path / "work"),
           "CALLBACK_FLUSH_S": "0.5"}

    def first_attempt(job):
        assert backend.wait_for_calls(1)  # `running` is delivered ...
        backend.set_down(True)  # ... then the backend goes away
        job.send_training_metrics(1, utils_module.TrainingMetrics(loss=0.5))
        raise utils_module.DatasetError("the node was lost")

    assert utils_module.run_job("train", utils_module.TRAIN_SETTINGS, first_attempt,
                                framework="test", argv=[], environ=env) == utils_module.EXIT_DATA
    journal = tmp_path / "work" / "callbacks.jsonl"
    undelivered = {e["seq"]: e["key"] for e in map(json.loads, journal.read_text().splitlines())}
    assert [c.body["seq"] for c in backend.calls] == [1]
    del undelivered[1]

    backend.set_down(False)
    assert utils_module.run_job("train", utils_module.TRAIN_SETTINGS,
                                lambda job: utils_module.JobResult(), framework="test", argv=[],
                                environ={**env, "CALLBACK_FLUSH_S": "10"}) == utils_module.EXIT_OK

    by_seq = {c.body["seq"]: c.headers["Idempotency-Key"] for c in backend.calls}
    assert {seq: by_seq[seq] for seq in undelivered} == undelivered  # re-sent, same keys
    # Every delivery of an event carries its key (in this one process the first attempt's
    # delivery thread may still get an event through: the backend stores it once).
    journaled = {**undelivered, 1: by_seq[1]}
    assert all(journaled[c.body["seq"]] == c.headers["Idempotency-Key"]
               for c in backend.duplicates)
    assert [c.body["seq"] for c in backend.calls + backend.duplicates].count(1) == 1  # delivered
    assert sorted(by_seq) == list(range(1, len(by_seq) + 1))  # seq goes on: 4 = running again
    second_attempt = {key.rsplit(":", 1)[0] for seq, key in by_seq.items() if seq > 3}
    assert len(second_attempt) == 1 and second_attempt.isdisjoint(
        key.rsplit(":", 1)[0] for key in undelivered.values())


def test_the_callback_api_is_valid_openapi_3_1_with_every_route() -> None:
    from openapi_spec_validator import validate

    document = json.loads(CALLBACK_API.read_text(encoding="utf-8"))
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert {path: next(iter(ops)) for path, ops in document["paths"].items()} == ROUTES
    answer = document["components"]["schemas"]["Answer"]["properties"]
    assert {"validation_result_id", "cancel"} <= set(answer)
    for path, method in ROUTES.items():
        operation = document["paths"][path][method]
        assert "Idempotency-Key" in operation["description"]  # the retry semantics, in words
        for example in operation["requestBody"]["content"]["application/json"]["examples"].values():
            assert callback_body_problems(method, path.lstrip("/"), example["value"]) == []


def test_the_callback_api_rejects_a_body_off_the_contract() -> None:
    problems = callback_body_problems("POST", "validation-results", {"epoch": 1, "source": "x"})
    assert any("primary_metric_name" in p for p in problems)
    assert any("source" in p for p in problems)
    assert callback_body_problems("POST", "nowhere", {}) == ["POST /nowhere is not in the "
                                                             "callback API"]
