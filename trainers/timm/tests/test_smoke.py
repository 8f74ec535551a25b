"""Smoke test of the timm trainer: train, evaluate and predict on the sample.

Self-contained (local storage, local MLflow, no backend, CPU, offline), so it runs in the
trainer's own environment: `pixi run test` in this folder, or `pytest tests` with its
requirements installed. The platform-level tests (S3, backend, MLflow server, torchrun) live in
the monorepo's tests/test_trainer_timm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1]


def run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER / script), *args], env=env, cwd=TRAINER,
                          capture_output=True, text=True, timeout=600)


def base_env(tmp_path: Path, storage: Path) -> dict[str, str]:
    return {**os.environ, "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(storage),
            "DATASET_ID": "sample", "NUM_WORKERS": "0", "DEVICE": "cpu",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.slow
def test_train_evaluate_predict_on_the_sample(tmp_path: Path) -> None:
    storage = tmp_path / "bucket"
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(storage),
                    "--train", "6", "--val", "3", "--test", "2"], check=True, timeout=120)
    env = {**base_env(tmp_path, storage), "JOB_ID": "smoke", "WORK_DIR": str(tmp_path / "work"),
           "MODEL_NAME": "test_resnet", "PRETRAINED": "false", "IMAGE_SIZE": "32",
           "EPOCHS": "2", "BATCH_SIZE": "16", "EMA": "true"}

    trained = run("train.py", env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints = storage / "checkpoints" / "job-smoke"
    assert {p.name for p in checkpoints.iterdir()} == {"epoch-1.pt", "epoch-2.pt", "best.pt",
                                                       "last.pt"}
    artifacts = storage / "artifacts" / "job-smoke"
    assert {"results.json", "per_class_report.csv", "confusion_matrix.png"} <= {
        p.name for p in artifacts.iterdir()}
    events = [json.loads(line) for line in (tmp_path / "work" / "callbacks.jsonl").open()]
    assert [e["body"]["status"] for e in events if e["route"] == "status"] == ["running",
                                                                              "completed"]
    assert [e["body"]["epoch"] for e in events if e["route"] == "training-metrics"] == [1, 2]
    validation = [e["body"] for e in events if e["route"] == "validation-results"]
    assert [v["epoch"] for v in validation] == [1, 2]
    assert set(validation[0]["per_class_metrics"]) == {str(d) for d in range(10)}

    evaluated = run("evaluate.py", {**env, "JOB_ID": "smoke-eval", "SPLIT": "test",
                                    "WORK_DIR": str(tmp_path / "eval"),
                                    "CHECKPOINT_PATH": "checkpoints/job-smoke/best.pt"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((storage / "artifacts" / "job-smoke-eval" / "evaluation" /
                         "results.json").read_text())
    assert report["split"] == "test" and report["images"] == 20
    assert sum(map(sum, report["confusion_matrix"])) == 20

    images = tmp_path / "images"
    images.mkdir()
    for digit in ("3", "7"):
        source = next((tmp_path / "work" / "cache").rglob(f"val/{digit}/*.png"))
        (images / f"digit-{digit}.png").write_bytes(source.read_bytes())
    predicted = run("predict.py", {**env, "JOB_ID": "smoke-predict",
                                   "WORK_DIR": str(tmp_path / "predict")},
                    "--checkpoint-path", str(checkpoints / "best.pt"), "--input", str(images),
                    "--top-k", "3")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    output = storage / "artifacts" / "job-smoke-predict" / "predictions" / "predictions.json"
    predictions = json.loads(output.read_text())["predictions"]
    assert sorted(p["image"] for p in predictions) == ["digit-3.png", "digit-7.png"]
    assert all(len(p["top_k"]) == 3 for p in predictions)


def test_bad_setting_fails_before_any_work(tmp_path: Path) -> None:
    env = {**base_env(tmp_path, tmp_path), "EPOCHS": "ten", "AMP": "fp8",
           "WORK_DIR": str(tmp_path / "work")}
    failed = run("train.py", env)
    assert failed.returncode == 2
    assert "EPOCHS='ten' is not an integer" in failed.stderr
    assert "AMP='fp8' is not one of auto, bf16, fp16, off" in failed.stderr
    assert (tmp_path / "work" / "failure").read_text().count("\n") == 1
