"""The Hugging Face transformers trainer as the platform runs it: real servers on loopback, tiny
real training, no download.

One classification job trains `microsoft/resnet-50`'s architecture, built offline from a small
configuration, on a platform-annotations zip (S3 server, recording backend, MLflow server, env
vars only) once per module; its reports, uploads and MLflow run are checked, then resume,
image folders and a folder dataset, evaluate, predict and export (ONNX, TorchScript) start from
it. The same job runs under `torchrun --nproc_per_node=2` (gloo on CPU). Every trainer
subprocess runs under the offline guard (tests/support/offline_guard), which refuses, and
records, any network attempt off loopback.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.contract import contract
from tests.support.servers import REPO, MlflowServer, RecordingBackend, S3Server, closed_port_url
from tests.support.trainer_jobs import (
    EXPORT_SCHEMA,
    bucket_keys,
    guarded,
    of_job,
    run_script,
    statuses,
)

TRAINER = REPO / "trainers" / "huggingface"
CLASSES = ["circle", "square", "triangle"]
_, _METRICS, _PER_CLASS = contract.TASK_METRICS["image_classification"]
METRICS, PER_CLASS = set(_METRICS), set(_PER_CLASS)
EXPERIMENT = "huggingface-trainer-tests"
EPOCHS = 3
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 3
VAL_IMAGES = VAL_PER_CLASS * len(CLASSES) - 1  # odd: padding that evens out shards must not count
MODEL = "microsoft/resnet-50"
TINY = {"TASK_TYPE": "image_classification", "MODEL_NAME": MODEL, "PRETRAINED": "false",
        "IMAGE_SIZE": "32", "BATCH_SIZE": "4", "DEVICE": "cpu", "NUM_WORKERS": "0",
        "OMP_NUM_THREADS": "1", "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "MLFLOW_DISABLE_TELEMETRY": "true"}

pytestmark = pytest.mark.slow


# --- datasets: the bundled sample in both layouts -------------------------------------------------


def write_sample(root: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(root), "--train",
                    str(TRAIN_PER_CLASS), "--val", str(VAL_PER_CLASS), *args], check=True,
                   capture_output=True, timeout=300)
    return root


def without_one_val_image(document: bytes) -> bytes:
    """The platform annotations less their last validation image (so the split is odd)."""
    data = json.loads(document)
    last = [image for image in data["images"] if image["split"] == "val"][-1]
    data["images"].remove(last)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != last["id"]]
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-sample")
    write_sample(root)
    write_sample(root, "--layout", "platform_annotations", "--id", "full")
    platform = root / "datasets" / "platform.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(root / "datasets" / "full.zip") as src, \
            zipfile.ZipFile(buffer, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "annotations_classification.json":
                data = without_one_val_image(data)
            out.writestr(info.filename, data)
    platform.write_bytes(buffer.getvalue())
    return {"platform": platform, "folders": root / "datasets" / "sample.zip"}


# --- running the trainer --------------------------------------------------------------------------


def run(script: str, env: dict[str, str], *args: str,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return run_script(TRAINER, script, env, *args, timeout=timeout)


def read_json(s3: S3Server, bucket: str, key: str) -> dict:
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def read_checkpoint(s3: S3Server, bucket: str, key: str) -> dict:
    import torch

    data = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass
class Trained:
    """The module's one training job and the servers it reported to."""

    s3: S3Server
    bucket: str
    backend: RecordingBackend
    mlflow: MlflowServer
    env: dict[str, str]  # the job's environment, less JOB_ID / WORK_DIR / callbacks
    result: subprocess.CompletedProcess
    tmp: Path

    def job_env(self, job_id: str, **settings: str) -> dict[str, str]:
        return guarded({**self.env, **self.backend.env(job_id), "WORK_DIR": str(self.tmp / job_id),
                        **settings}, self.guard_log(job_id))

    def guard_log(self, job_id: str) -> Path:
        return self.tmp / f"guard-{job_id}.log"

    def check(self) -> None:
        assert self.result.returncode == 0, self.result.stderr[-5000:]


@pytest.fixture(scope="module")
def trained(s3_server: S3Server, mlflow_server: MlflowServer, samples: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("huggingface")
    bucket = f"hf-{uuid.uuid4().hex[:8]}"
    s3_server.start()
    s3_server.client.create_bucket(Bucket=bucket)
    s3_server.client.upload_file(str(samples["platform"]), bucket, "datasets/platform.zip")
    s3_server.client.upload_file(str(samples["folders"]), bucket, "datasets/folders.zip")
    with zipfile.ZipFile(samples["folders"]) as zf:  # the same images as a folder dataset
        for name in zf.namelist():
            if not name.endswith("/"):
                s3_server.client.put_object(Bucket=bucket, Key=f"datasets/loose/{name}",
                                            Body=zf.read(name))
    backend = RecordingBackend()
    env = {**clean_environ(), **s3_server.env(), "STORAGE_BUCKET": bucket,
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "DATASET_ID": "platform",
           "HF_HOME": str(tmp / "hf"), **TINY}
    trained = Trained(s3_server, bucket, backend, mlflow_server, env, None, tmp)
    trained.result = run("train.py", trained.job_env("e2e", EPOCHS=str(EPOCHS)))
    yield trained
    backend.close()


# --- the training job, end to end -----------------------------------------------------------------


def test_training_reports_each_epoch_once_with_the_platforms_names(trained: Trained) -> None:
    trained.check()
    backend = trained.backend
    assert statuses(backend, "e2e") == ["running", "completed"]

    training = of_job(backend, "training-metrics", "e2e")
    assert [t["epoch"] for t in training] == [1, 2, 3], "an epoch was reported twice or missed"
    for body in training:
        assert body["step"] == body["epoch"] and body["loss"] > 0
        assert 0 <= body["accuracy"] <= 1 and body["learning_rate"] >= 0
        assert body["extra_metrics"]["total_epochs"] == EPOCHS
        assert body["extra_metrics"]["throughput_img_s"] > 0
    assert [t["checkpoint_path"] for t in training] == [
        f"s3://{trained.bucket}/checkpoints/job-e2e/epoch-{n}.pt" for n in (1, 2, 3)]

    validations = of_job(backend, "validation-results", "e2e")
    assert [v["epoch"] for v in validations] == [1, 2, 3]
    for body in validations:
        assert body["task_type"] == "image_classification"
        assert set(body["metrics"]) == METRICS
        assert body["primary_metric_name"] == "accuracy"
        assert body["primary_metric_value"] == body["metrics"]["accuracy"]
        assert body["class_names"] == CLASSES and list(body["per_class_metrics"]) == CLASSES
        assert all(set(m) == PER_CLASS for m in body["per_class_metrics"].values())
        matrix = body["confusion_matrix"]
        assert sum(map(sum, matrix)) == VAL_IMAGES
        assert body["metrics"]["accuracy"] == pytest.approx(
            sum(matrix[i][i] for i in range(len(CLASSES))) / VAL_IMAGES)
        assert isinstance(body["is_best"], bool) and body["overall_loss"] > 0
    assert validations[0]["is_best"]

    # The last validation's images, each named as in the dataset, with its top-5.
    records = [r for call in backend.calls if call.route == "validation-image-results"
               and call.headers["Idempotency-Key"].startswith("e2e:") for r in call.body]
    assert len(records) == VAL_IMAGES
    assert {r["epoch"] for r in records} == {EPOCHS}
    for record in records:
        assert record["true_label"] == CLASSES[record["true_label_id"]]
        assert record["is_correct"] == (record["true_label_id"] == record["predicted_label_id"])
        assert len(record["top5_predictions"]) == len(CLASSES)

    completed = of_job(backend, "status", "e2e")[-1]
    assert METRICS <= set(completed["metrics"])
    assert completed["checkpoint_path"] == f"s3://{trained.bucket}/checkpoints/job-e2e/best.pt"
    assert not trained.guard_log("e2e").exists(), trained.guard_log("e2e").read_text()


def test_training_uploads_self_describing_checkpoints_and_the_report(trained: Trained) -> None:
    trained.check()
    assert bucket_keys(trained.s3, trained.bucket, "checkpoints/job-e2e/") == {
        "best.pt", "last.pt", "epoch-1.pt", "epoch-2.pt", "epoch-3.pt"}
    last = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-e2e/last.pt")
    assert last["format"] == "vision-platform/huggingface/2"
    assert last["class_names"] == CLASSES and last["model_name"] == MODEL
    assert last["task_type"] == "image_classification" and last["image_size"] == 32
    assert last["epoch"] == last["epochs"] == EPOCHS
    # The architecture as plain JSON: a transformers config, rebuilt with no download.
    assert last["model_config"]["model_type"] == "resnet"
    assert json.loads(json.dumps(last["model_config"])) == last["model_config"]
    assert last["model_config"]["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    assert last["versions"]["transformers"] == "5.23.0"
    assert last["provenance"]["framework_version"] == "5.23.0"
    assert last["provenance"]["dataset_etag"]
    for name in ("best.pt", "last.pt", "epoch-1.pt", "epoch-3.pt"):
        checkpoint = read_checkpoint(trained.s3, trained.bucket, f"checkpoints/job-e2e/{name}")
        assert {"model", "model_config", "class_names", "mean", "std", "config"} <= set(
            checkpoint)
        assert not {"optimizer", "scheduler", "scaler"} & set(checkpoint), name

    report = read_json(trained.s3, trained.bucket, "artifacts/job-e2e/results.json")
    best = [v for v in of_job(trained.backend, "validation-results", "e2e") if v["is_best"]][-1]
    assert report["epoch"] == best["epoch"] and report["split"] == "val"
    assert report["confusion_matrix"] == best["confusion_matrix"]


def test_one_mlflow_run_per_job_with_params_and_metrics(trained: Trained) -> None:
    trained.check()
    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "e2e"]
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.run_name == "job-e2e" and run_.info.status == "FINISHED"
    assert run_.data.params["MODEL_NAME"] == MODEL
    assert run_.data.tags["framework"] == "huggingface"
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(run_.data.metrics)


# --- other layouts: image folders (zip) and a folder dataset --------------------------------------


@pytest.mark.parametrize("dataset", ["folders", "loose"])
def test_trains_from_image_folders_in_a_zip_and_in_a_folder(trained: Trained,
                                                            dataset: str) -> None:
    trained.check()
    job_id = f"layout-{dataset}"
    result = run("train.py", trained.job_env(job_id, EPOCHS="1", DATASET_ID=dataset,
                                             MODEL_NAME="google/vit-base-patch16-224"))
    assert result.returncode == 0, result.stderr[-5000:]
    assert statuses(trained.backend, job_id) == ["running", "completed"]
    [validation] = of_job(trained.backend, "validation-results", job_id)
    assert validation["class_names"] == CLASSES and set(validation["metrics"]) == METRICS
    assert sum(map(sum, validation["confusion_matrix"])) == VAL_PER_CLASS * len(CLASSES)


# --- under torchrun -------------------------------------------------------------------------------


def test_torchrun_two_processes_report_once_and_gather_validation(trained: Trained) -> None:
    trained.check()
    backend = trained.backend
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(TRAINER / "train.py")], cwd=TRAINER,
                            env=trained.job_env("ddp", EPOCHS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert statuses(backend, "ddp") == ["running", "completed"]
    [validation] = of_job(backend, "validation-results", "ddp")
    assert sum(map(sum, validation["confusion_matrix"])) == VAL_IMAGES

    # What both processes gathered is what one process computes on the saved weights.
    evaluated = run("evaluate.py", trained.job_env(
        "ddp-eval", CHECKPOINT_PATH="checkpoints/job-ddp/epoch-1.pt"))
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    [single] = of_job(backend, "validation-results", "ddp-eval")
    assert single["confusion_matrix"] == validation["confusion_matrix"]
    assert single["overall_loss"] == pytest.approx(validation["overall_loss"], rel=1e-4)


# --- starting from a checkpoint -------------------------------------------------------------------


def test_resume_restores_optimizer_and_schedule(trained: Trained) -> None:
    trained.check()
    backend = trained.backend
    # The platform cancels the job as it starts (its epochs take a fraction of a second, less
    # than a report's round trip): it stops after its first epoch, and its last.pt stays
    # resumable.
    backend.cancel_after("status", len(backend.bodies("status")) + 1)
    partial = run("train.py", trained.job_env("partial", EPOCHS=str(EPOCHS)))
    assert partial.returncode == contract.EXIT_CANCELLED, partial.stderr[-5000:]
    assert statuses(backend, "partial")[-1] == "cancelled"
    done = max(t["epoch"] for t in of_job(backend, "training-metrics", "partial"))
    assert done < EPOCHS
    last = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-partial/last.pt")
    assert last["epoch"] == done and {"optimizer", "scheduler"} <= set(last)

    # Its weights-only epoch-1.pt cannot resume it: one line, naming last.pt.
    refused = run("train.py", trained.job_env(
        "partial-again", JOB_ID="partial", EPOCHS=str(EPOCHS),
        CHECKPOINT_PATH="checkpoints/job-partial/epoch-1.pt"))
    assert refused.returncode == contract.EXIT_DATA, refused.stderr[-5000:]
    failure = (trained.tmp / "partial-again" / "failure").read_text().strip()
    assert failure.endswith("cannot resume job partial: resume from "
                            "checkpoints/job-partial/last.pt")

    resumed = run("train.py", trained.job_env(
        "resumed", EPOCHS=str(EPOCHS), CHECKPOINT_PATH="checkpoints/job-partial/last.pt"))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming after epoch {done} of {EPOCHS}" in resumed.stderr
    training = of_job(backend, "training-metrics", "resumed")
    later = list(range(done + 1, EPOCHS + 1))
    assert [t["epoch"] for t in training] == later
    # The learning rate continues the original schedule, and AdamW its step count.
    original = [t for t in of_job(backend, "training-metrics", "e2e") if t["epoch"] > done]
    assert [t["learning_rate"] for t in training] == pytest.approx(
        [t["learning_rate"] for t in original], rel=1e-9, abs=1e-12)
    import torch

    steps = {job: torch.load(trained.tmp / job / "checkpoints" / "last.pt", weights_only=True)[
        "optimizer"]["state"][0]["step"].item() for job in ("e2e", "resumed")}
    assert steps["resumed"] == steps["e2e"] > 0


def test_a_finished_model_fine_tunes_on_other_classes(trained: Trained,
                                                     samples: dict[str, Path]) -> None:
    trained.check()
    buffer = io.BytesIO()
    with zipfile.ZipFile(samples["folders"]) as src, zipfile.ZipFile(buffer, "w") as out:
        for info in src.infolist():
            if "/triangle/" not in info.filename:
                out.writestr(info.filename, src.read(info.filename))
    trained.s3.client.put_object(Bucket=trained.bucket, Key="datasets/two.zip",
                                 Body=buffer.getvalue())
    tuned = run("train.py", trained.job_env(
        "tuned", EPOCHS="1", DATASET_ID="two",
        CHECKPOINT_PATH=f"s3://{trained.bucket}/checkpoints/job-e2e/best.pt"))
    assert tuned.returncode == 0, tuned.stderr[-5000:]
    assert "new classifier for this dataset's classes" in tuned.stderr
    [validation] = of_job(trained.backend, "validation-results", "tuned")
    assert validation["class_names"] == ["circle", "square"]
    tuned_best = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-tuned/best.pt")
    original = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-e2e/best.pt")
    assert tuned_best["model_name"] == MODEL
    assert tuned_best["model_config"]["id2label"] == {"0": "circle", "1": "square"}
    assert tuned_best["model"]["classifier.1.weight"].shape[0] == 2
    # The backbone came from the finished model: a few AdamW updates at LEARNING_RATE 0.001
    # move a weight by ~0.001 each, a fresh initialisation by ~0.3.
    stem = "resnet.embedder.embedder.convolution.weight"
    assert (tuned_best["model"][stem] - original["model"][stem]).abs().max() < 0.05


# --- evaluate, predict, export --------------------------------------------------------------------


def test_evaluate_the_trained_checkpoint(trained: Trained) -> None:
    trained.check()
    evaluated = run("evaluate.py", trained.job_env(
        "eval", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt"))
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    assert set(json.loads(evaluated.stdout.strip().splitlines()[-1])) == METRICS | {"loss"}
    report = read_json(trained.s3, trained.bucket, "artifacts/job-eval/evaluation/results.json")
    assert report["split"] == "val" and report["images"] == VAL_IMAGES
    [validation] = of_job(trained.backend, "validation-results", "eval")
    best = [v for v in of_job(trained.backend, "validation-results", "e2e") if v["is_best"]][-1]
    assert validation["confusion_matrix"] == best["confusion_matrix"]
    assert statuses(trained.backend, "eval") == ["running", "completed"]


def test_predict_on_a_prefix(trained: Trained) -> None:
    trained.check()
    images = sorted(trained.tmp.glob("e2e/cache/**/images/val/*.png"))[:3]
    names = ["a.png", "Form-ü.PNG", "c.png"]
    for image, name in zip(images, names, strict=True):
        trained.s3.client.upload_file(str(image), trained.bucket, f"inputs/{name}")
    predicted = run("predict.py", trained.job_env(
        "predict", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", INPUT_PATH="inputs/",
        TOP_K="2"))
    assert predicted.returncode == 0, predicted.stderr[-5000:]
    output = read_json(trained.s3, trained.bucket,
                       "artifacts/job-predict/predictions/predictions.json")
    assert output["class_names"] == CLASSES and output["task_type"] == "image_classification"
    assert sorted(p["image"] for p in output["predictions"]) == sorted(names)
    for prediction in output["predictions"]:
        top = prediction["top_k"]
        assert len(top) == 2 and all(t["class_name"] == CLASSES[t["class_id"]] for t in top)
        assert top[0]["confidence"] >= top[1]["confidence"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_pytorch_logits(trained: Trained, fmt: str) -> None:
    trained.check()
    import jsonschema

    job_id = f"export-{fmt}"
    result = run("export.py", trained.job_env(
        job_id, CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", EXPORT_FORMAT=fmt,
        DYNAMIC_BATCH="true" if fmt == "onnx" else "false"))
    assert result.returncode == 0, result.stderr[-5000:]
    archive = trained.tmp / f"{job_id}.zip"
    trained.s3.client.download_file(trained.bucket,
                                    f"artifacts/job-{job_id}/export/export-{fmt}.zip",
                                    str(archive))
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(["metadata.json", f"model.{fmt}"])
        metadata = json.loads(zf.read("metadata.json"))
    validator = jsonschema.Draft202012Validator(json.loads(EXPORT_SCHEMA.read_text()),
                                                format_checker=jsonschema.FormatChecker())
    assert [e.message for e in validator.iter_errors(metadata)] == []
    batch = -1 if fmt == "onnx" else 1
    assert metadata["trainer"] == "huggingface" and metadata["class_names"] == CLASSES
    assert metadata["input"]["shape"] == [batch, 3, 32, 32]
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", [batch, len(CLASSES)])]
    assert metadata["framework"]["version"] == "5.23.0"
    check = metadata["verification"]
    assert check["status"] == "passed" and check["max_abs_diff"] <= check["tolerance"]


# --- bad input: one line, `failed`, non-zero exit -------------------------------------------------


def test_pretrained_weights_offline_train_the_architecture_from_random_weights(
        s3: S3Server, backend: RecordingBackend, job_env: dict, samples: dict[str, Path],
        tmp_path: Path) -> None:
    # No network, no cache: a Hub name the task builds offline trains that architecture (one
    # warning), as PRETRAINED=false would; nothing is downloaded (the guard refuses sockets).
    s3.put_file("datasets/sample.zip", samples["folders"])
    env = {**job_env, **TINY, "DATASET_ID": "sample", "PRETRAINED": "true", "EPOCHS": "1",
           "MLFLOW_TRACKING_URI": closed_port_url(), "HF_HOME": str(tmp_path / "hf")}
    result = run("train.py", guarded(env, tmp_path / "guard.log"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert backend.bodies("status")[-1]["status"] == "completed"
    warned = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert len(warned) == 1 and MODEL in warned[0], result.stderr[-3000:]


def test_pretrained_weights_of_an_unknown_model_offline_fail_fast_with_one_line(
        s3: S3Server, backend: RecordingBackend, job_env: dict, samples: dict[str, Path],
        tmp_path: Path) -> None:
    s3.put_file("datasets/sample.zip", samples["folders"])
    started = time.monotonic()
    unknown = "someone/vit-nobody-built"
    env = {**job_env, **TINY, "DATASET_ID": "sample", "PRETRAINED": "true",
           "MODEL_NAME": unknown, "MLFLOW_TRACKING_URI": closed_port_url(),
           "HF_HOME": str(tmp_path / "hf")}
    result = run("train.py", guarded(env, tmp_path / "guard.log"))
    assert result.returncode == contract.EXIT_CONFIG, result.stderr[-3000:]
    error = backend.bodies("status")[-1]["error"]
    assert error.startswith(f"PRETRAINED=true but the pretrained weights of {unknown} are not "
                            "in the local cache") and "\n" not in error
    assert "Traceback" not in result.stderr
    assert not s3.keys("checkpoints/") and not s3.keys("datasets/sample/")
    # the Hub probe failed at once, so HF_HUB_OFFLINE spared huggingface_hub's retries
    assert time.monotonic() - started < 45
