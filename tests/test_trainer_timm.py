"""The timm trainer as the platform runs it: real servers on loopback, tiny real training.

One job trains timm's `test_resnet` once per module (S3 server, recording backend, MLflow server,
env vars only) and is reused: its reports, uploads and MLflow run are checked, then resume,
fine-tuning, evaluate, predict and export (ONNX, TorchScript) start from its checkpoints. The
same job runs under `torchrun --nproc_per_node=2` (gloo on CPU). Bad inputs fail fast with one
line. Every trainer subprocess runs under the offline guard (tests/support/offline_guard), which
refuses, and records, any network attempt off loopback.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.contract import contract
from tests.support.servers import (
    REPO,
    MlflowServer,
    RecordingBackend,
    S3Server,
    closed_port_url,
)
from tests.support.trainer_jobs import (
    EXPORT_SCHEMA,
    bucket_keys,
    guarded,
    of_job,
    run_script,
    statuses,
)

TRAINER = REPO / "trainers" / "timm"
CLASSES = [str(d) for d in range(10)]
_, _METRICS, _PER_CLASS = contract.TASK_METRICS["image_classification"]
METRICS, PER_CLASS = set(_METRICS), set(_PER_CLASS)
REPORT = {"results.json", "per_class_report.csv", "confusion_matrix.png"}
EXPERIMENT = "timm-trainer-tests"
EPOCHS = 3
VAL_IMAGES = 29  # odd: a DistributedSampler's padding would count one image twice
TINY = {"MODEL_NAME": "test_resnet", "PRETRAINED": "false", "IMAGE_SIZE": "32",
        "BATCH_SIZE": "8", "DEVICE": "cpu", "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1",
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT, "MLFLOW_DISABLE_TELEMETRY": "true"}

pytestmark = pytest.mark.slow


# --- datasets: the bundled sample, and variants of it ---------------------------------------------


def rezip(source: Path, *, keep: Callable[[str], bool] = lambda name: True,
          rename: Callable[[str], str] = lambda name: name,
          replace: dict[str, bytes] | None = None, folders: tuple[str, ...] = ()) -> bytes:
    """A copy of an archive: members filtered, renamed or replaced, explicit folders added."""
    replace = replace or {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(buffer, "w") as out:
        for info in src.infolist():
            if keep(info.filename):
                out.writestr(rename(info.filename),
                             replace.get(info.filename) or src.read(info.filename))
        for folder in folders:
            out.writestr(zipfile.ZipInfo(folder), b"")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits sample, small: 4 training, 3 validation, 2 test images per class,
    less one validation image."""
    root = tmp_path_factory.mktemp("timm-sample")
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(root), "--train", "4",
                    "--val", "3", "--test", "2"], check=True, capture_output=True, timeout=300)
    full = root / "datasets" / "sample.zip"
    odd = root / "odd.zip"
    odd.write_bytes(rezip(full, keep=lambda name: name != "sample/val/9/9_0002.png"))
    return odd


# --- running the trainer --------------------------------------------------------------------------


def run(script: str, env: dict[str, str], *args: str,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return run_script(TRAINER, script, env, *args, timeout=timeout)


def torchrun(env: dict[str, str], processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(TRAINER / "train.py")],
                          cwd=TRAINER, env=env, capture_output=True, text=True, timeout=900)


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
def trained(s3_server: S3Server, mlflow_server: MlflowServer, sample_zip: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("timm")
    bucket = f"timm-{uuid.uuid4().hex[:8]}"
    s3_server.start()
    s3_server.client.create_bucket(Bucket=bucket)
    s3_server.client.upload_file(str(sample_zip), bucket, "datasets/sample.zip")
    backend = RecordingBackend()
    env = {**clean_environ(), **s3_server.env(), "STORAGE_BUCKET": bucket,
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "DATASET_ID": "sample",
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
        extra = body["extra_metrics"]
        assert {"epoch_time_s", "eta_s", "throughput_img_s"} <= set(extra)
        assert extra["total_epochs"] == EPOCHS and extra["throughput_img_s"] > 0
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
        assert len(matrix) == len(CLASSES) and all(len(row) == len(CLASSES) for row in matrix)
        assert sum(map(sum, matrix)) == VAL_IMAGES
        assert [sum(row) for row in matrix] == [
            m["support"] for m in body["per_class_metrics"].values()]
        assert body["metrics"]["accuracy"] == pytest.approx(
            sum(matrix[i][i] for i in range(len(CLASSES))) / VAL_IMAGES)
        assert isinstance(body["is_best"], bool) and body["overall_loss"] > 0
    assert validations[0]["is_best"]

    completed = of_job(backend, "status", "e2e")[-1]
    assert METRICS <= set(completed["metrics"])
    assert completed["checkpoint_path"] == f"s3://{trained.bucket}/checkpoints/job-e2e/best.pt"
    assert all(call.headers["X-Internal-Auth"] == "test-token" for call in backend.calls)
    assert not trained.guard_log("e2e").exists(), trained.guard_log("e2e").read_text()


def test_training_uploads_self_describing_checkpoints_and_the_report(trained: Trained) -> None:
    trained.check()
    assert bucket_keys(trained.s3, trained.bucket, "checkpoints/job-e2e/") == {
        "best.pt", "last.pt", "epoch-1.pt", "epoch-2.pt", "epoch-3.pt"}
    assert REPORT <= bucket_keys(trained.s3, trained.bucket, "artifacts/job-e2e/")

    last = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-e2e/last.pt")
    assert last["format"] == "vision-platform/timm/2"
    assert last["class_names"] == CLASSES and last["model_name"] == "test_resnet"
    assert last["epoch"] == last["epochs"] == EPOCHS
    assert last["data_config"]["input_size"] == [3, 32, 32]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(last["data_config"])
    assert last["versions"]["timm"] == "1.0.31"
    # A finished job holds weights only, every file about the size of the weights.
    sizes = {}
    for name in ("best.pt", "last.pt", "epoch-1.pt", "epoch-2.pt", "epoch-3.pt"):
        checkpoint = read_checkpoint(trained.s3, trained.bucket, f"checkpoints/job-e2e/{name}")
        assert {"model", "class_names", "data_config", "versions", "config"} <= set(checkpoint)
        assert not {"optimizer", "scheduler", "ema", "scaler"} & set(checkpoint), name
        sizes[name] = trained.s3.client.head_object(
            Bucket=trained.bucket, Key=f"checkpoints/job-e2e/{name}")["ContentLength"]
    assert sum(sizes.values()) / (len(sizes) * sizes["epoch-3.pt"]) <= 1.1, sizes
    assert last["provenance"]["framework_version"] == "1.0.31"
    assert last["provenance"]["dataset_etag"]

    report = read_json(trained.s3, trained.bucket, "artifacts/job-e2e/results.json")
    best = [v for v in of_job(trained.backend, "validation-results", "e2e") if v["is_best"]][-1]
    assert report["epoch"] == best["epoch"] and report["split"] == "val"
    # best.pt, evaluated again as saved, scores what its epoch reported
    assert report["confusion_matrix"] == best["confusion_matrix"]
    assert list(report["per_class_metrics"]) == CLASSES


def test_one_mlflow_run_per_job_with_params_metrics_and_artifacts(trained: Trained) -> None:
    trained.check()
    from mlflow.tracking import MlflowClient

    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "e2e"]
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.run_name == "job-e2e" and run_.info.status == "FINISHED"
    assert run_.data.params["EPOCHS"] == str(EPOCHS)
    assert run_.data.params["MODEL_NAME"] == "test_resnet"
    assert run_.data.tags["framework"] == "timm"
    assert run_.data.tags["dataset_etag"] == read_checkpoint(
        trained.s3, trained.bucket, "checkpoints/job-e2e/best.pt")["provenance"]["dataset_etag"]
    assert "MINIO_SECRET_KEY" not in run_.data.params
    client = MlflowClient(trained.mlflow.uri)
    for metric in ("val_accuracy", "val_f1_score", "train_loss", "train_throughput_img_s"):
        history = client.get_metric_history(run_.info.run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3], metric
    assert REPORT <= {a.path for a in client.list_artifacts(run_.info.run_id)}


# --- under torchrun -------------------------------------------------------------------------------


def test_torchrun_two_processes_report_once_and_reduce_validation(trained: Trained) -> None:
    trained.check()
    backend = trained.backend
    result = torchrun(trained.job_env("ddp", EPOCHS="2", CHECKPOINT_EVERY="2"))
    assert result.returncode == 0, result.stderr[-5000:]

    assert statuses(backend, "ddp") == ["running", "completed"]
    assert [t["epoch"] for t in of_job(backend, "training-metrics", "ddp")] == [1, 2]
    validations = of_job(backend, "validation-results", "ddp")
    assert [v["epoch"] for v in validations] == [1, 2]
    assert all(sum(map(sum, v["confusion_matrix"])) == VAL_IMAGES for v in validations)
    assert bucket_keys(trained.s3, trained.bucket, "checkpoints/job-ddp/") == {
        "best.pt", "last.pt", "epoch-2.pt"}
    assert REPORT <= bucket_keys(trained.s3, trained.bucket, "artifacts/job-ddp/")
    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "ddp"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # torchrun's launcher looks up this machine's own name (socket.getfqdn): not the network
    log = trained.guard_log("ddp")
    attempts = log.read_text().splitlines() if log.exists() else []
    own_name = f"gethostbyaddr {socket.gethostname()} "
    assert [a for a in attempts if own_name not in a or "getfqdn" not in a] == []

    # The two ranks' shards, summed, are what one process computes on the saved weights.
    evaluated = run("evaluate.py", trained.job_env(
        "ddp-eval", CHECKPOINT_PATH="checkpoints/job-ddp/epoch-2.pt"))
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    [single] = of_job(backend, "validation-results", "ddp-eval")
    assert single["confusion_matrix"] == validations[-1]["confusion_matrix"]
    assert single["metrics"]["accuracy"] == validations[-1]["metrics"]["accuracy"]
    assert single["overall_loss"] == pytest.approx(validations[-1]["overall_loss"], rel=1e-4)


# --- starting from a checkpoint -------------------------------------------------------------------


def test_resume_restores_optimizer_and_schedule(trained: Trained) -> None:
    trained.check()
    backend = trained.backend
    # The platform cancels the same job after its first epoch: its last.pt stays resumable.
    backend.cancel_after("training-metrics", len(backend.bodies("training-metrics")) + 1)
    partial = run("train.py", trained.job_env("partial", EPOCHS=str(EPOCHS)))
    assert partial.returncode == 4, partial.stderr[-5000:]
    done = max(t["epoch"] for t in of_job(backend, "training-metrics", "partial"))
    assert done < EPOCHS
    last = read_checkpoint(trained.s3, trained.bucket, "checkpoints/job-partial/last.pt")
    assert last["epoch"] == done and {"optimizer", "scheduler", "ema"} <= set(last)

    # Its weights-only epoch-1.pt cannot resume it: one line, naming last.pt.
    refused = run("train.py", trained.job_env(
        "partial-again", JOB_ID="partial", EPOCHS=str(EPOCHS),
        CHECKPOINT_PATH="checkpoints/job-partial/epoch-1.pt"))
    assert refused.returncode == 3, refused.stderr[-5000:]
    failure = (trained.tmp / "partial-again" / "failure").read_text().strip()
    assert failure.endswith("cannot resume job partial: resume from "
                            "checkpoints/job-partial/last.pt")

    resumed = run("train.py", trained.job_env(
        "resumed", EPOCHS=str(EPOCHS), CHECKPOINT_PATH="checkpoints/job-partial/last.pt"))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming after epoch {done} of 3" in resumed.stderr
    training = of_job(backend, "training-metrics", "resumed")
    later = list(range(done + 1, EPOCHS + 1))
    assert [t["epoch"] for t in training] == later
    assert [v["epoch"] for v in of_job(backend, "validation-results", "resumed")] == later

    # The learning rate continues the original schedule (warmup, then cosine to zero)...
    original = [t for t in of_job(backend, "training-metrics", "e2e") if t["epoch"] > done]
    assert [t["learning_rate"] for t in training] == pytest.approx(
        [t["learning_rate"] for t in original], rel=1e-9, abs=1e-12)
    assert training[0]["learning_rate"] > 0 or done == EPOCHS - 1  # cosine ends at zero
    # ... and AdamW continues counting its steps: its state came back with it (the local
    # last.pt: a finished job's last.pt in the bucket holds weights only).
    import torch

    steps = {job: torch.load(trained.tmp / job / "checkpoints" / "last.pt", weights_only=True)[
        "optimizer"]["state"][0]["step"].item() for job in ("e2e", "resumed")}
    assert steps["resumed"] == steps["e2e"] > 0


def test_a_finished_model_fine_tunes_on_other_classes(trained: Trained, sample_zip: Path) -> None:
    trained.check()
    three = {f"sample/{split}/{c}/" for split in ("train", "val", "test") for c in "012"}
    trained.s3.client.put_object(Bucket=trained.bucket, Key="datasets/three.zip", Body=rezip(
        sample_zip, keep=lambda name: any(name.startswith(p) for p in three)))
    tuned = run("train.py", trained.job_env(
        "tuned", EPOCHS="1", DATASET_ID="three",
        CHECKPOINT_PATH=f"s3://{trained.bucket}/checkpoints/job-e2e/best.pt"))
    assert tuned.returncode == 0, tuned.stderr[-5000:]
    assert "new classifier for this dataset's classes" in tuned.stderr
    assert statuses(trained.backend, "tuned") == ["running", "completed"]
    [validation] = of_job(trained.backend, "validation-results", "tuned")
    assert validation["class_names"] == ["0", "1", "2"]


# --- evaluate and predict -------------------------------------------------------------------------


def test_evaluate_the_trained_checkpoint_on_the_test_split(trained: Trained) -> None:
    trained.check()
    evaluated = run("evaluate.py", trained.job_env(
        "eval", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", SPLIT="test"))
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    assert set(json.loads(evaluated.stdout.strip().splitlines()[-1])) == METRICS | {"loss"}
    assert bucket_keys(trained.s3, trained.bucket, "artifacts/job-eval/evaluation/") == REPORT
    report = read_json(trained.s3, trained.bucket, "artifacts/job-eval/evaluation/results.json")
    assert report["split"] == "test" and report["images"] == 20
    assert list(report["per_class_metrics"]) == CLASSES
    [validation] = of_job(trained.backend, "validation-results", "eval")
    assert validation["epoch"] == report["epoch"] and set(validation["metrics"]) == METRICS
    assert statuses(trained.backend, "eval") == ["running", "completed"]
    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "eval"]
    assert [r.info.run_name for r in runs] == ["eval-eval"]
    assert not trained.guard_log("eval").exists(), trained.guard_log("eval").read_text()


def test_predict_on_a_prefix(trained: Trained) -> None:
    trained.check()
    images = sorted(trained.tmp.glob("e2e/cache/**/val/*/*.png"))[:3]
    names = ["a.png", "Ziffer-ü.PNG", "c.png"]
    for image, name in zip(images, names, strict=True):
        trained.s3.client.upload_file(str(image), trained.bucket, f"inputs/{name}")
    predicted = run("predict.py", trained.job_env(
        "predict", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", INPUT_PATH="inputs/",
        TOP_K="3"))
    assert predicted.returncode == 0, predicted.stderr[-5000:]
    output = read_json(trained.s3, trained.bucket,
                       "artifacts/job-predict/predictions/predictions.json")
    assert output["class_names"] == CLASSES and output["task_type"] == "image_classification"
    assert sorted(p["image"] for p in output["predictions"]) == sorted(names)
    for prediction in output["predictions"]:
        top = prediction["top_k"]
        assert len(top) == 3 and all(t["class_name"] == CLASSES[t["class_id"]] for t in top)
        assert [t["confidence"] for t in top] == sorted((t["confidence"] for t in top),
                                                        reverse=True)
        assert 0 < sum(t["confidence"] for t in top) <= 1.0 + 1e-6


# --- bad input: one line, `failed`, non-zero exit -------------------------------------------------


PNG_0 = "sample/train/0/0_0000.png"
EXIT_DATA, EXIT_CONFIG = contract.EXIT_DATA, contract.EXIT_CONFIG
BAD_INPUTS = {
    "no val split": (
        {"keep": lambda name: "/val/" not in name}, {}, EXIT_DATA,
        "dataset has no val/valid/validation folder (found: test, train)"),
    "empty class folder": (
        {"keep": lambda name: "/train/3/" not in name, "folders": ("sample/train/3/",)}, {},
        EXIT_DATA, "class folder train/3 has no images"),
    "unreadable image": (
        {"replace": {PNG_0: b"not an image"}}, {}, EXIT_DATA,
        "train/0/0_0000.png: unreadable"),
    "unknown EXTRA_ARGS keys": (
        None, {"EXTRA_ARGS": '{"drop_rate": 0.1, "dropout": 0.5, "depth": 4}'}, EXIT_CONFIG,
        "EXTRA_ARGS.dropout is not an option of this trainer"),
    "PRETRAINED=true offline": (
        None, {"PRETRAINED": "true"}, EXIT_CONFIG,
        "PRETRAINED=true but the pretrained weights of test_resnet are not in the local cache"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_with_one_line(case: str, s3: S3Server, backend: RecordingBackend,
                                       job_env: dict, sample_zip: Path, tmp_path: Path) -> None:
    variant, settings, exit_code, reason = BAD_INPUTS[case]
    s3.put_bytes("datasets/bad.zip", rezip(sample_zip, **(variant or {})))
    log = tmp_path / "guard.log"
    started = time.monotonic()
    # No tracking: these jobs fail before any epoch, and MLflow's client only adds seconds.
    env = {**job_env, **TINY, "DATASET_ID": "bad", "MLFLOW_TRACKING_URI": closed_port_url(),
           "HF_HOME": str(tmp_path / "hf"), **settings}
    result = run("train.py", guarded(env, log))
    assert result.returncode == exit_code, result.stderr[-3000:]
    # EXTRA_ARGS is checked with the settings, before the job reports `running`.
    assert backend.statuses() == (["failed"] if "EXTRA_ARGS" in settings
                                  else ["running", "failed"])
    error = backend.bodies("status")[-1]["error"]
    assert reason in error and "\n" not in error and "Traceback" not in result.stderr
    assert (tmp_path / "work" / "failure").read_text().strip() == error
    assert not s3.keys("checkpoints/"), "a failed job uploaded checkpoints"
    elapsed = time.monotonic() - started
    if settings.get("PRETRAINED") != "true":
        assert not log.exists(), log.read_text()  # failed without any network attempt
    else:  # the Hub probe failed at once, so HF_HUB_OFFLINE spared huggingface_hub's retries
        assert elapsed < 45, f"{elapsed:.0f} s: offline, the Hub retries for ~47 s"
    assert elapsed < 180


def test_evaluating_on_other_classes_fails_with_one_line(trained: Trained,
                                                         sample_zip: Path) -> None:
    trained.check()
    trained.s3.client.put_object(Bucket=trained.bucket, Key="datasets/renamed.zip", Body=rezip(
        sample_zip, rename=lambda name: name.replace("/9/", "/nine/")))
    evaluated = run("evaluate.py", trained.job_env(
        "eval-mismatch", DATASET_ID="renamed", MLFLOW_TRACKING_URI=closed_port_url(),
        CHECKPOINT_PATH="checkpoints/job-e2e/best.pt"))
    assert evaluated.returncode == contract.EXIT_DATA, evaluated.stderr[-3000:]
    assert statuses(trained.backend, "eval-mismatch") == ["running", "failed"]
    error = of_job(trained.backend, "status", "eval-mismatch")[-1]["error"]
    assert error == "val/ classes differ from the checkpoint's: missing 9, extra nine"
    assert "Traceback" not in evaluated.stderr


# --- export ---------------------------------------------------------------------------------------

EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript"}
EXPORT_EXTRA = {"onnx": {"DYNAMIC_BATCH": "true"}, "torchscript": {}}  # one dynamic, one fixed
EXPORT_ATOL = 1e-4  # most |exported - PyTorch| on the logits (float32), as export.py enforces
# Run in the trainer's folder: the PyTorch side is the trainer's own model and eval transform
# (what predict.py uses); each exported model runs only through what its metadata.json says, and
# metadata.json's preprocessing is rebuilt with PIL and numpy alone, as a deployment would.
EXPORT_PROBE = """
import json, sys, tempfile, warnings, zipfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
from data import eval_transform
from model import load_checkpoint, model_from_checkpoint

checkpoint_path, images_dir, *archives = sys.argv[1:]
checkpoint = load_checkpoint(Path(checkpoint_path))
model = model_from_checkpoint(checkpoint, torch.device("cpu"))
transform = eval_transform(checkpoint["data_config"])
images = sorted(Path(images_dir).rglob("*.png"))
batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
with torch.inference_mode():
    reference = model(batch).numpy()

def from_metadata(path, steps):
    resize, crop = steps["resize"], steps["center_crop"]
    assert steps["letterbox"] is False and resize["keep_aspect_ratio"] is True
    with Image.open(path) as image:
        image = image.convert(steps["channel_order"])
        w, h = image.size
        short = resize["shorter_side"]
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, Image.Resampling.BILINEAR)
        left = int(round((size[0] - crop["width"]) / 2))
        top = int(round((size[1] - crop["height"]) / 2))
        image = image.crop((left, top, left + crop["width"], top + crop["height"]))
        x = np.asarray(image, np.float32) * np.float32(steps["rescale_factor"])
    x = (x - np.asarray(steps["mean"], np.float32)) / np.asarray(steps["std"], np.float32)
    return x.transpose(2, 0, 1)

report = {"images": len(images)}
for archive in archives:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
        metadata = json.loads((Path(tmp) / "metadata.json").read_text())
        model_file = str(Path(tmp) / metadata["file"])
        if metadata["format"] == "onnx":
            import onnxruntime
            session = onnxruntime.InferenceSession(model_file, providers=["CPUExecutionProvider"])
            run = lambda x: session.run(None, {metadata["input"]["name"]: x})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(model_file, map_location="cpu")
            run = lambda x: module(torch.from_numpy(x)).detach().numpy()
        fixed = metadata["input"]["shape"][0]
        chunks = [batch] if fixed == -1 else list(batch.split(fixed))
        with torch.inference_mode():
            outputs = np.concatenate([run(chunk.numpy()) for chunk in chunks])
    rebuilt = np.stack([from_metadata(p, metadata["preprocessing"]) for p in images])
    report[metadata["format"]] = {
        "max_abs_diff": float(np.abs(outputs - reference).max()), "calls": len(chunks),
        "preprocessing_max_abs_diff": float(np.abs(rebuilt - batch.numpy()).max())}
print(json.dumps(report))
"""


def run_side_by_side(jobs: dict[str, tuple[str, dict[str, str]]],
                     timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Scripts started together (each is mostly torch start-up), waited for together."""
    started = {key: subprocess.Popen([sys.executable, str(TRAINER / script)], cwd=TRAINER,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for key, (script, env) in jobs.items()}
    results = {}
    for key, process in started.items():
        out, err = process.communicate(timeout=timeout)
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


def uploaded_besides_the_journal(trained: Trained, job_id: str) -> set[str]:
    return bucket_keys(trained.s3, trained.bucket, f"artifacts/job-{job_id}/") - {
        contract.JOURNAL_NAME}


def test_export_to_onnx_and_torchscript_reproduces_the_pytorch_logits(trained: Trained) -> None:
    trained.check()
    import jsonschema

    best = "checkpoints/job-e2e/best.pt"
    results = run_side_by_side({fmt: ("export.py", trained.job_env(
        f"export-{fmt}", CHECKPOINT_PATH=best, EXPORT_FORMAT=fmt, **EXPORT_EXTRA[fmt]))
        for fmt in EXPORT_FILES})
    validator = jsonschema.Draft202012Validator(json.loads(EXPORT_SCHEMA.read_text()),
                                                format_checker=jsonschema.FormatChecker())
    checkpoint_bytes = trained.s3.client.get_object(Bucket=trained.bucket, Key=best)[
        "Body"].read()
    archives = []
    for fmt, result in results.items():
        job_id = f"export-{fmt}"
        assert result.returncode == 0, result.stderr[-5000:]
        assert statuses(trained.backend, job_id) == ["running", "completed"]
        assert uploaded_besides_the_journal(trained, job_id) == {f"export/export-{fmt}.zip"}
        archive = trained.tmp / f"export-{fmt}.zip"
        trained.s3.client.download_file(trained.bucket,
                                        f"artifacts/job-{job_id}/export/export-{fmt}.zip",
                                        str(archive))
        archives.append(archive)
        with zipfile.ZipFile(archive) as zf:
            assert sorted(zf.namelist()) == ["metadata.json", EXPORT_FILES[fmt]]
            metadata = json.loads(zf.read("metadata.json"))
        assert [e.message for e in validator.iter_errors(metadata)] == []
        batch = -1 if fmt == "onnx" else 1
        assert metadata["format"] == fmt and metadata["trainer"] == "timm"
        assert metadata["task_type"] == "image_classification"
        assert metadata["class_names"] == CLASSES
        assert metadata["input"] == {"name": "images", "shape": [batch, 3, 32, 32],
                                     "dtype": "float32", "layout": "NCHW"}
        assert metadata["outputs"][0]["shape"] == [batch, len(CLASSES)]
        assert metadata["dynamic_batch"] is (fmt == "onnx") and metadata["half"] is False
        # test_resnet's resolved data config: bilinear, crop_pct 0.95, mean = std = 0.5
        steps = metadata["preprocessing"]
        assert steps["resize"]["shorter_side"] == 33 and steps["resize"]["interpolation"] == (
            "bilinear")
        assert steps["center_crop"] == {"height": 32, "width": 32}
        assert steps["mean"] == [0.5, 0.5, 0.5] and steps["std"] == [0.5, 0.5, 0.5]
        source = metadata["source_checkpoint"]
        assert source["path"] == best and source["model_name"] == "test_resnet"
        assert source["sha256"] == hashlib.sha256(checkpoint_bytes).hexdigest()
        assert metadata["framework"]["name"] == "timm"
        assert metadata["framework"]["version"] == "1.0.31"
        assert metadata["exporter"]["name"] == {"onnx": "torch.onnx.export",
                                                "torchscript": "torch.jit.trace"}[fmt]
        check = metadata["verification"]
        assert check["status"] == "passed" and check["max_abs_diff"] <= check["tolerance"]
        assert check["batch"] == (2 if fmt == "onnx" else 1)

    local_best = trained.tmp / "e2e" / "checkpoints" / "best.pt"
    images = next(trained.tmp.glob("e2e/cache/**/val"))  # the staged sample's 29 val images
    probe = subprocess.run([sys.executable, "-c", EXPORT_PROBE, str(local_best), str(images),
                            *map(str, archives)], cwd=TRAINER,
                           env={**clean_environ(), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout)
    assert report["images"] == VAL_IMAGES
    for fmt in EXPORT_FILES:
        assert report[fmt]["max_abs_diff"] <= EXPORT_ATOL, (fmt, report[fmt])
        assert report[fmt]["preprocessing_max_abs_diff"] <= 1e-5, (fmt, report[fmt])
    assert report["onnx"]["calls"] == 1, "a dynamic-batch model takes every image at once"
    assert report["torchscript"]["calls"] == VAL_IMAGES, "a fixed batch of 1"


EXPORT_FAILURES = {
    "unsupported format": (
        {"EXPORT_FORMAT": "tflite"}, ["failed"],
        "EXPORT_FORMAT='tflite' is not one of onnx, torchscript"),
    "onnx not installed": (
        {"EXPORT_FORMAT": "onnx", "ABSENT": "onnx"}, ["running", "failed"],
        "EXPORT_FORMAT=onnx needs the onnx package, which this machine does not have"),
    "half without a GPU": (
        {"EXPORT_FORMAT": "torchscript", "HALF": "true"}, ["running", "failed"],
        "HALF=true needs a CUDA device (DEVICE resolves to the CPU)"),
}


@pytest.mark.parametrize("case", EXPORT_FAILURES, ids=list(EXPORT_FAILURES))
def test_export_fails_at_once_with_one_line_and_uploads_nothing(trained: Trained, case: str,
                                                                 tmp_path: Path) -> None:
    settings, expected, reason = EXPORT_FAILURES[case]
    settings = dict(settings)
    job_id = "export-" + case.replace(" ", "-")
    env = trained.job_env(job_id, MLFLOW_TRACKING_URI=closed_port_url(),
                          CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", **settings)
    absent = settings.pop("ABSENT", None)
    env.pop("ABSENT", None)
    if absent:  # a package that fails to import, as when it is not installed
        (tmp_path / absent).mkdir()
        (tmp_path / absent / "__init__.py").write_text(
            f"raise ImportError(\"No module named '{absent}'\")\n")
        env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    result = run("export.py", env, timeout=300)
    assert result.returncode == contract.EXIT_CONFIG, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(reason), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert statuses(trained.backend, job_id) == expected
    assert of_job(trained.backend, "status", job_id)[-1]["error"] == reason
    work = trained.tmp / job_id
    assert (work / "failure").read_text().strip() == reason
    assert not (work / "inputs").exists(), "the checkpoint must not have been downloaded"
    assert not (work / "export").exists()
    assert uploaded_besides_the_journal(trained, job_id) == set()


# --- capabilities ---------------------------------------------------------------------------------


CAPABILITIES_PROBE = """
import json, re, timm, utils, capabilities
manifest = json.loads(open("capabilities.json").read())
pattern = manifest["model_name_pattern"]
pretrained = set(timm.list_models(pretrained=True))
print(json.dumps({
    "not_timm": [m for m in capabilities.MODELS if not timm.is_model(m)],
    "no_weights": [m for m in capabilities.MODELS if m not in pretrained
                   and not any(p.startswith(m + ".") for p in pretrained)],
    "unmatched": [m for m in timm.list_models() + sorted(pretrained)
                  if not re.fullmatch(pattern, m)],
    "valid": [utils.validate_job_settings(manifest, "train", {"DATASET_ID": "d", "MODEL_NAME": m})
              for m in ("resnet50", "vit_large_patch14_clip_224.openai",
                        "hf-hub:timm/resnet18.a1_in1k")],
    "invalid": utils.validate_job_settings(manifest, "train",
                                           {"DATASET_ID": "d", "MODEL_NAME": "ResNet 50!"}),
}))
"""


def test_capabilities_declare_timm_models_and_admit_any_timm_name() -> None:
    manifest = json.loads((TRAINER / "capabilities.json").read_text(encoding="utf-8"))
    for script in ("train.py", "export.py"):
        printed = subprocess.run([sys.executable, script, "--capabilities"], cwd=TRAINER,
                                 env={**clean_environ(), "EPOCHS": "ten"}, capture_output=True,
                                 text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr[-2000:]
        assert json.loads(printed.stdout) == manifest, script
    assert manifest["framework"] == {"name": "timm", "package": "timm", "version": "1.0.31"}
    assert [t["task_type"] for t in manifest["tasks"]] == ["image_classification"]
    assert {"resnet50", "convnext_tiny", "vit_small_patch16_224", "test_resnet"} <= {
        m["name"] for m in manifest["models"]}
    assert [f["name"] for f in manifest["export_formats"]] == ["onnx", "torchscript"]
    assert [d["name"] for d in manifest["dataset_layouts"]] == ["image_folder",
                                                                 "platform_annotations"]

    probe = subprocess.run([sys.executable, "-c", CAPABILITIES_PROBE], cwd=TRAINER,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert found["not_timm"] == [] and found["no_weights"] == []
    assert found["unmatched"] == [], "the pattern must admit every timm model name"
    assert found["valid"] == [[], [], []]
    assert len(found["invalid"]) == 1 and found["invalid"][0].startswith(
        "MODEL_NAME='ResNet 50!' is not a model of this trainer")


def test_readme_documents_every_setting() -> None:
    """The README's settings tables are the scripts' own declarations (no re-typing)."""
    tables = subprocess.run(
        [sys.executable, "-c", "import utils, train, evaluate, predict, export\n"
         "for m in (train, evaluate, predict, export): "
         "print(utils.settings_markdown(m.SETTINGS))"],
        cwd=TRAINER, capture_output=True, text=True, timeout=120, check=True).stdout
    readme = (TRAINER / "README.md").read_text(encoding="utf-8")
    missing = [line for line in tables.splitlines() if line and line not in readme]
    assert not missing, "README.md lacks settings rows:\n" + "\n".join(missing[:10])
