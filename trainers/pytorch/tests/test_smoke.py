"""Smoke test of the PyTorch trainer.

Train, evaluate, predict and export on the sample.

Self-contained (local storage, local MLflow, no backend, CPU), so it runs in the trainer's own
environment: `pixi run test` in this folder, or `pytest tests` with its requirements installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1]


def run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER / script), *args], env=env, cwd=TRAINER,
                          capture_output=True, text=True, timeout=600)


def test_train_evaluate_predict_export_on_the_sample(tmp_path: Path) -> None:
    # The committed manifest is what the scripts declare (python tools/sync.py regenerates it).
    described = run("train.py", dict(os.environ), "--capabilities")
    assert described.returncode == 0, described.stderr[-3000:]
    committed = (TRAINER / "capabilities.json").read_text(encoding="utf-8")
    assert json.loads(described.stdout) == json.loads(committed)

    storage = tmp_path / "bucket"
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(storage),
                    "--train", "8", "--val", "4"], check=True, timeout=120)
    env = {**os.environ, "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(storage),
           "DATASET_ID": "sample", "JOB_ID": "smoke", "WORK_DIR": str(tmp_path / "work"),
           "EPOCHS": "2", "BATCH_SIZE": "8", "NUM_WORKERS": "0", "DEVICE": "cpu",
           "PRETRAINED": "false", "IMAGE_SIZE": "64",
           # The template's own model, whatever default_model was answered (FRAMEWORK: yours).
           "MODEL_NAME": "tinycnn"}

    trained = run("train.py", env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    best = storage / "checkpoints" / "job-smoke" / "best.pt"
    assert best.is_file() and (storage / "checkpoints" / "job-smoke" / "epoch-2.pt").is_file()
    events = [json.loads(line) for line in (tmp_path / "work" / "callbacks.jsonl").open()]
    assert [e["body"]["status"] for e in events if e["route"] == "status"] == ["running",
                                                                              "completed"]
    assert [e["body"]["epoch"] for e in events if e["route"] == "training-metrics"] == [1, 2]

    evaluated = run("evaluate.py", {**env, "JOB_ID": "smoke-eval",
                                    "WORK_DIR": str(tmp_path / "eval"),
                                    "CHECKPOINT_PATH": "checkpoints/job-smoke/best.pt"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (storage / "artifacts" / "job-smoke-eval" / "evaluation" / "metrics.json").is_file()

    predicted = run("predict.py", {**env, "JOB_ID": "smoke-predict",
                                   "WORK_DIR": str(tmp_path / "predict")},
                    "--checkpoint-path", str(best), "--input-path",
                    str(tmp_path / "work" / "cache"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    output = storage / "artifacts" / "job-smoke-predict" / "predictions" / "predictions.json"
    assert json.loads(output.read_text())["predictions"], "no predictions written"

    exported = run("export.py", {**env, "JOB_ID": "smoke-export",
                                 "WORK_DIR": str(tmp_path / "export"),
                                 "CHECKPOINT_PATH": "checkpoints/job-smoke/best.pt",
                                 "EXPORT_FORMAT": "onnx"})
    assert exported.returncode == 0, exported.stderr[-3000:]
    archive = storage / "artifacts" / "job-smoke-export" / "export" / "export-onnx.zip"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["metadata.json", "model.onnx"]
        metadata = json.loads(zf.read("metadata.json"))
    assert metadata["verification"]["status"] == "passed", metadata["verification"]


def test_bad_setting_fails_before_any_work(tmp_path: Path) -> None:
    env = {**os.environ, "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(tmp_path),
           "DATASET_ID": "sample", "EPOCHS": "ten", "WORK_DIR": str(tmp_path / "work")}
    failed = run("train.py", env)
    assert failed.returncode == 2
    assert "EPOCHS='ten' is not an integer" in failed.stderr
    assert (tmp_path / "work" / "failure").read_text().strip().endswith("is not an integer")
