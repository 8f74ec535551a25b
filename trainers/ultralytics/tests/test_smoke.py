"""Smoke test of the Ultralytics trainer: train, evaluate, predict and export on a tiny sample.

Self-contained (local storage, a SQLite MLflow store, no backend, CPU, offline), so it runs in
the trainer's own environment: `pixi run test` in this folder, or `pytest tests` with its
requirements installed. The scripts run as subprocesses, the way the platform runs them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


def run(script: str, env: dict[str, str], *args: str, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER / script), *args], env=env,
                          cwd=cwd or TRAINER, capture_output=True, text=True, timeout=600)


def events(work_dir: Path, route: str) -> list[dict]:
    lines = (work_dir / "callbacks.jsonl").read_text(encoding="utf-8").splitlines()
    return [e["body"] for e in map(json.loads, lines) if e["route"] == route]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bucket")
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(root), "--train", "12",
                    "--val", "6", "--size", "128"], check=True, timeout=120,
                   capture_output=True)
    return root


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for every job here, its experiment's artifacts kept beside it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).create_experiment('vision-platform', "
                    "artifact_location=sys.argv[2])", uri, (root / "artifacts").as_uri()],
                   check=True, timeout=300, capture_output=True,
                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return uri


def job_env(bucket: Path, mlflow_uri: str, work_dir: Path, **settings: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("STORAGE_", "MINIO_", "MLFLOW_", "YOLO_", "ULTRALYTICS_"))}
    return {**keep, "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket),
            "MLFLOW_TRACKING_URI": mlflow_uri, "WORK_DIR": str(work_dir), "DEVICE": "cpu",
            "NUM_WORKERS": "0", "MLFLOW_DISABLE_TELEMETRY": "true", **settings}


@pytest.mark.slow
def test_train_evaluate_predict_export_on_the_sample(bucket: Path, mlflow_uri: str,
                                              tmp_path: Path) -> None:
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    cwd.mkdir()
    env = job_env(bucket, mlflow_uri, work, DATASET_ID="sample", JOB_ID="smoke", EPOCHS="2",
                  BATCH_SIZE="8", IMAGE_SIZE="128", PRETRAINED="false", OFFLINE="true")
    trained = run("train.py", env, cwd=cwd)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "best checkpoint:" in trained.stdout and "━" not in trained.stdout
    assert not list(cwd.iterdir()), "the job wrote into its current directory"

    checkpoints = bucket / "checkpoints" / "job-smoke"
    assert {p.name for p in checkpoints.iterdir()} == {"best.pt", "last.pt", "epoch-1.pt",
                                                       "epoch-2.pt"}
    artifacts = {p.name for p in (bucket / "artifacts" / "job-smoke").iterdir()}
    assert {"results.csv", "results.png", "results.json", "args.yaml", "confusion_matrix.png",
            "BoxPR_curve.png", "BoxF1_curve.png"} <= artifacts
    assert [e["status"] for e in events(work, "status")] == ["running", "completed"]
    assert [e["epoch"] for e in events(work, "training-metrics")] == [1, 2]
    validations = events(work, "validation-results")
    assert [v["epoch"] for v in validations] == [1, 2]
    assert set(validations[-1]["metrics"]) == {"mAP@0.5", "mAP@0.5:0.95", "precision", "recall"}
    assert list(validations[-1]["per_class_metrics"]) == CLASSES

    evaluated = run("evaluate.py", {**env, "JOB_ID": "smoke-eval", "WORK_DIR": str(tmp_path / "e"),
                                    "CHECKPOINT_PATH": "checkpoints/job-smoke/best.pt"})
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    report = bucket / "artifacts" / "job-smoke-eval" / "evaluation" / "metrics.json"
    assert list(json.loads(report.read_text())["per_class_metrics"]) == CLASSES

    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((work / "cache").rglob("val_0000[0-2].jpg")):
        (images / source.name).write_bytes(source.read_bytes())
    predicted = run("predict.py", {**env, "JOB_ID": "smoke-predict",
                                   "WORK_DIR": str(tmp_path / "p"), "CONF_THRESHOLD": "0.0"},
                    "--checkpoint-path", str(checkpoints / "best.pt"), "--input-path",
                    str(images))
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    output = bucket / "artifacts" / "job-smoke-predict" / "predictions"
    predictions = json.loads((output / "predictions.json").read_text())["predictions"]
    assert [p["image"] for p in predictions] == sorted(p.name for p in images.iterdir())
    assert all(len(d["box_xyxy"]) == 4 for p in predictions for d in p["detections"])
    assert len(list((output / "annotated").iterdir())) == len(predictions)

    exported = run("export.py", {**env, "JOB_ID": "smoke-export", "WORK_DIR": str(tmp_path / "x"),
                                 "CHECKPOINT_PATH": "checkpoints/job-smoke/best.pt",
                                 "EXPORT_FORMAT": "onnx"})
    assert exported.returncode == 0, exported.stderr[-4000:]
    archive = bucket / "artifacts" / "job-smoke-export" / "export" / "export-onnx.zip"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["metadata.json", "model.onnx"]
        metadata = json.loads(zf.read("metadata.json"))
    assert metadata["class_names"] == CLASSES and metadata["input"]["shape"] == [1, 3, 128, 128]
    assert metadata["verification"]["status"] == "passed"


@pytest.mark.slow
def test_unknown_extra_args_fail_before_any_work(bucket: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on: tracking off at once
        sock.bind(("127.0.0.1", 0))
        no_tracking = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = job_env(bucket, no_tracking, tmp_path / "work", DATASET_ID="sample",
                  PRETRAINED="false", EXTRA_ARGS='{"mosiac": 0.5, "epochs": 3}')
    failed = run("train.py", env)
    assert failed.returncode == 2, failed.stderr[-3000:]
    reason = (tmp_path / "work" / "failure").read_text()
    assert "EXTRA_ARGS.mosiac is not an option of this trainer (did you mean 'mosaic'?)" in reason
    assert "EXTRA_ARGS.epochs cannot be set: set by the job: use EPOCHS" in reason
    assert not (tmp_path / "work" / "cache").exists(), "the dataset was staged anyway"


def test_help_is_instant_and_the_readme_table_is_generated() -> None:
    probe = ("import sys, train, utils; print(utils.settings_markdown(train.SETTINGS), end=''); "
             "heavy = {'torch', 'ultralytics', 'mlflow', 'boto3'} & set(sys.modules); "
             "sys.exit(f'imported at module level: {heavy}' if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=TRAINER, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout in (TRAINER / "README.md").read_text(encoding="utf-8")


def test_several_gpus_relaunch_under_torchrun_once() -> None:
    """The launch decision only (no GPU here): DEVICE=0,1 -> 2 workers, never inside a worker."""
    probe = (
        "import json, sys, distributed, train\n"
        "env = {'STORAGE_TYPE': 'local', 'LOCAL_STORAGE_ROOT': '/nonexistent', 'DATASET_ID': 'x'}\n"
        "plan = lambda argv, **extra: distributed.processes_to_launch(\n"
        "    train.SETTINGS, argv, prog='train.py', environ={**env, **extra})\n"
        "print(json.dumps([plan(['--device', '0,1']), plan(['--device', 'cuda:0,1,2']),\n"
        "                  plan(['--device', '0']), plan(['--device', 'cpu']),\n"
        "                  plan(['--device', '0,1'], LOCAL_RANK='0'), plan(['--epochs', 'x']),\n"
        "                  distributed.launch_command('train.py', ['-h'], 2)[1:5]]))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=TRAINER, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [2, 3, 0, 0, 0, 0, ["-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node=2"]]
