"""A run writes only under its work dir and the bucket, never into the trainer's own folder.

Each trainer trains one tiny epoch (its conformance.toml settings) from its own folder, the way a
person runs it from a checkout and an image runs it from its read-only code folder, with MLflow
on a fresh SQLite store whose experiment does not exist yet: the case where MLflow puts the run's
artifacts in ./mlruns of the current folder unless the experiment names a location.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conformance.harness import load_spec
from tests.conftest import clean_environ
from tests.support.servers import REPO

TRAINERS = ("pytorch", "timm", "ultralytics")


def files_under(folder: Path) -> set[str]:
    """Every file and folder below `folder`, except Python's bytecode caches."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_training_from_the_trainer_folder_adds_no_file_there(trainer: str, tmp_path: Path
                                                             ) -> None:
    folder = REPO / "trainers" / trainer
    spec = load_spec(trainer, folder)
    spec.write_dataset(tmp_path / "bucket")
    work_dir = tmp_path / "work"
    experiment = f"fresh-{uuid.uuid4().hex[:8]}"
    env = {**clean_environ(), **spec.train_env, "STORAGE_TYPE": "local",
           "LOCAL_STORAGE_ROOT": str(tmp_path / "bucket"), "DATASET_ID": spec.dataset_id,
           "JOB_ID": "stray", "EPOCHS": "1", "DEVICE": "cpu", "WORK_DIR": str(work_dir),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_DISABLE_TELEMETRY": "true"}
    before = files_under(folder)

    done = subprocess.run([sys.executable, "train.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert files_under(folder) - before == set()
    # The run was tracked, and its artifacts went where the experiment says: the work dir.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    assert found.artifact_location == (work_dir / "mlruns").as_uri()
    [run] = client.search_runs([found.experiment_id])
    assert run.info.status == "FINISHED"
    logged = [p for p in (work_dir / "mlruns").rglob("*") if p.is_file()]
    assert logged, "no artifact was logged to MLflow"
