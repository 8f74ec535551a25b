"""The Hugging Face trainer's object detection and semantic segmentation, as the platform runs
them: the trainer's own platform-annotations samples on the S3 server (a zip, and the same
dataset as a folder of objects), the recording backend validating every body against the
callback API, the MLflow server, tiny offline models (RT-DETR v2, SegFormer) and no download.

Per task: train two epochs from the zip and check the contract's metric names, per-class names
(the file's categories; `background` first for segmentation), the validated images (exactly the
file's val split) and the per-image view; train one epoch from the folder; evaluate the best
checkpoint; predict on the dataset's images; export it to TorchScript with the numeric check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.contract import contract
from tests.support.servers import REPO, RecordingBackend, S3Server
from tests.support.trainer_jobs import guarded, of_job, run_script, statuses

TRAINER = REPO / "trainers" / "huggingface"
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    task: str
    model: str
    image_size: int
    annotations: str
    per_image_fields: tuple[str, ...]
    background_first: bool


CASES = {
    "object_detection": Case("object_detection", "PekingU/rtdetr_v2_r18vd", 96,
                             "annotations_detection.json", ("true_boxes", "predicted_boxes"),
                             False),
    "semantic_segmentation": Case("semantic_segmentation", "nvidia/mit-b0", 64,
                                  "annotations_segmentation.json",
                                  ("true_mask_path", "predicted_mask_path"), True),
}


def write_sample(root: Path, case: Case) -> Path:
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(root), "--task",
                    case.task, "--id", case.task, "--train", "16", "--val", "6",
                    "--image-size", str(case.image_size)],
                   check=True, capture_output=True, timeout=300)
    return root / "datasets" / f"{case.task}.zip"


def val_file_names(archive: Path, case: Case) -> tuple[set[str], list[str]]:
    """The file's val split (file names under images/, as the UI names images) and its
    category names, as the file says."""
    with zipfile.ZipFile(archive) as zf:  # at the root, or in the archive's one folder
        member = next(n for n in zf.namelist() if Path(n).name == case.annotations)
        document = json.loads(zf.read(member))
    splits = (document.get("split_config") or {}).get("splits") or {}
    val = {image["file_name"].removeprefix("images/") for image in document["images"]
           if splits.get(str(image["id"]), image.get("split")) == "val"}
    names = [c["name"] for c in document["categories"] if c["name"] != "__background__"]
    return val, names


def upload_as_folder(s3: S3Server, archive: Path, prefix: str) -> None:
    """The archive's files as objects under `prefix/`, its one top-level folder (if any) left
    out: a platform folder dataset has its annotation file right under the prefix."""
    with zipfile.ZipFile(archive) as zf:
        files = [info.filename for info in zf.infolist() if not info.is_dir()]
        tops = {name.split("/", 1)[0] for name in files}
        wrapper = f"{tops.pop()}/" if len(tops) == 1 and all("/" in n for n in files) else ""
        for name in files:
            s3.put_bytes(f"{prefix}/{name.removeprefix(wrapper)}", zf.read(name))


def image_results(backend: RecordingBackend, job_id: str) -> list[dict]:
    """The per-image records a job sent (each POST's body is a list of them)."""
    return [record for body in backend.bodies("validation-image-results") for record in body
            if record.get("job_id") == job_id]


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_task_trains_evaluates_predicts_and_exports(case: Case, s3: S3Server,
                                                      backend: RecordingBackend, job_env: dict,
                                                      tmp_path: Path) -> None:
    archive = write_sample(tmp_path / "sample", case)
    s3.put_file(f"datasets/{case.task}.zip", archive)
    val_names, categories = val_file_names(archive, case)
    settings = {"TASK_TYPE": case.task, "MODEL_NAME": case.model, "PRETRAINED": "false",
                "IMAGE_SIZE": str(case.image_size), "BATCH_SIZE": "8", "EPOCHS": "2",
                "OMP_NUM_THREADS": "1", "MLFLOW_EXPERIMENT_NAME": "huggingface-task-tests"}

    def job(job_id: str, script: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
        env = guarded({**job_env, **settings, **backend.env(job_id),
                       "WORK_DIR": str(tmp_path / job_id), **extra}, tmp_path / "guard.log")
        done = run_script(TRAINER, script, env, *args)
        assert done.returncode == 0, done.stderr[-4000:]
        assert statuses(backend, job_id)[-1] == "completed"
        return done

    # Train from the zip: the contract's names, the file's classes and val split.
    job("zip", "train.py", DATASET_ID=case.task)
    primary, metrics, per_class = contract.TASK_METRICS[case.task]
    validations = of_job(backend, "validation-results", "zip")
    assert [v["epoch"] for v in validations] == [1, 2]
    for validation in validations:
        assert validation["task_type"] == case.task
        assert validation["primary_metric_name"] == primary
        assert set(metrics) <= set(validation["metrics"])
        expected = (["background"] if case.background_first else []) + categories
        assert validation["class_names"] == expected
        assert list(validation["per_class_metrics"]) == expected
        assert all(set(per_class) <= set(values)
                   for values in validation["per_class_metrics"].values())
    records = image_results(backend, "zip")
    assert {r["image_name"] for r in records} == val_names  # exactly the file's val split
    assert all(r[field] is not None for r in records for field in case.per_image_fields)
    assert len(s3.keys("checkpoints/job-zip/")) == 4  # epoch-1, epoch-2, best, last

    # The same dataset as a folder of objects (no zip under that id).
    upload_as_folder(s3, archive, f"datasets/{case.task}-folder")
    job("folder", "train.py", DATASET_ID=f"{case.task}-folder", EPOCHS="1")
    folder_records = image_results(backend, "folder")
    assert {r["image_name"] for r in folder_records} == val_names

    # Evaluate, predict and export the best checkpoint.
    job("evaluate", "evaluate.py", DATASET_ID=case.task,
        CHECKPOINT_PATH="checkpoints/job-zip/best.pt")
    evaluated = of_job(backend, "validation-results", "evaluate")[-1]
    assert evaluated["source"] == "evaluate" and evaluated["primary_metric_name"] == primary
    job("predict", "predict.py", INPUT_PATH=f"datasets/{case.task}.zip",
        CHECKPOINT_PATH="checkpoints/job-zip/best.pt")
    predictions = json.loads(s3.get_bytes("artifacts/job-predict/predictions/predictions.json"))
    assert predictions["task_type"] == case.task
    assert len(predictions["predictions"]) == 22  # every image of the dataset
    if case.task == "semantic_segmentation":  # each record's mask was uploaded beside it
        masks = {key.rsplit("/", 1)[-1] for key in s3.keys("artifacts/job-predict/predictions/")}
        assert {Path(r["mask"]).name for r in predictions["predictions"]} <= masks
    job("export", "export.py", CHECKPOINT_PATH="checkpoints/job-zip/best.pt",
        EXPORT_FORMAT="torchscript")
    assert s3.keys("artifacts/job-export/export/export-torchscript.zip")
