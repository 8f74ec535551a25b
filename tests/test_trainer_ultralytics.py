"""The Ultralytics trainer as the platform runs it: real servers on loopback, tiny real training.

One detection model is trained once per module (S3 server, recording backend, MLflow server,
env vars only) and reused: its report, uploads and MLflow run are checked, then evaluate, predict
and resume start from its checkpoints. Segmentation and classification get one short run each;
bad inputs fail fast. Every trainer subprocess runs under an offline guard (a sitecustomize on
its PYTHONPATH) that refuses, and records, any network attempt off loopback.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import signal
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
from tests.support.servers import (
    REPO,
    MlflowServer,
    RecordingBackend,
    S3Server,
    closed_port_url,
    wait_until,
)
from tests.support.trainer_jobs import (
    EXPORT_SCHEMA,
    bucket_keys,
    guarded,
    of_job,
    run_script,
    statuses,
)

TRAINER = REPO / "trainers" / "ultralytics"
CLASSES = ["circle", "square", "triangle"]
_, _METRICS, _PER_CLASS = contract.TASK_METRICS["object_detection"]
DETECTION_METRICS, DETECTION_PER_CLASS = set(_METRICS), set(_PER_CLASS)
EXPERIMENT = "ultralytics-trainer-tests"
TINY = {"IMAGE_SIZE": "128", "BATCH_SIZE": "8", "PRETRAINED": "false", "DEVICE": "cpu",
        "NUM_WORKERS": "0", "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}

pytestmark = pytest.mark.slow


def sample_zip(tmp: Path, task: str, name: str, train: int = 12, val: int = 6) -> Path:
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(tmp), "--task", task,
                    "--name", name, "--train", str(train), "--val", str(val), "--size", "128"],
                   check=True, capture_output=True, timeout=120)
    return tmp / "datasets" / f"{name}.zip"


def run(script: str, env: dict[str, str], *args: str, cwd: Path = TRAINER,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return run_script(TRAINER, script, env, *args, cwd=cwd, timeout=timeout)


@dataclass
class Trained:
    """The module's one training job and the servers it reported to."""

    s3: S3Server
    bucket: str
    backend: RecordingBackend
    mlflow: MlflowServer
    env: dict[str, str]  # the job's environment, less JOB_ID / WORK_DIR / callbacks
    result: subprocess.CompletedProcess
    cwd: Path
    guard_log: Path
    tmp: Path

    def job_env(self, job_id: str, **settings: str) -> dict[str, str]:
        return {**self.env, **self.backend.env(job_id), "WORK_DIR": str(self.tmp / job_id),
                **settings}


@pytest.fixture(scope="module")
def trained(s3_server: S3Server, mlflow_server: MlflowServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("ultralytics")
    bucket = f"ultralytics-{uuid.uuid4().hex[:8]}"
    s3_server.start()
    s3_server.client.create_bucket(Bucket=bucket)
    s3_server.client.upload_file(str(sample_zip(tmp / "data", "detect", "sample", 16, 8)),
                                 bucket, "datasets/sample.zip")
    backend = RecordingBackend()
    env = {**clean_environ(), **s3_server.env(), "STORAGE_BUCKET": bucket,
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "DATASET_ID": "sample", **TINY}
    cwd = tmp / "cwd"
    cwd.mkdir()
    guard_log = tmp / "guard-e2e.log"
    trained = Trained(s3_server, bucket, backend, mlflow_server, env, None, cwd, guard_log, tmp)
    job_env = trained.job_env("e2e", EPOCHS="2", CHECKPOINT_EVERY="2")
    trained.result = run("train.py", guarded(job_env, guard_log), cwd=cwd)
    yield trained
    backend.close()


def read_checkpoint(trained: Trained, key: str) -> dict:
    import torch

    data = trained.s3.client.get_object(Bucket=trained.bucket, Key=key)["Body"].read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def check_trained(trained: Trained) -> None:
    assert trained.result.returncode == 0, trained.result.stderr[-5000:]


# --- the training job, end to end ---------------------------------------------------------------


def test_training_reports_each_epoch_once_with_the_platforms_names(trained: Trained) -> None:
    check_trained(trained)
    backend = trained.backend
    assert statuses(backend, "e2e") == ["running", "completed"]

    training = of_job(backend, "training-metrics", "e2e")
    assert [t["epoch"] for t in training] == [1, 2]
    for body in training:
        assert body["step"] == body["epoch"] and body["loss"] > 0 and body["learning_rate"] > 0
        extra = body["extra_metrics"]
        assert {"box_loss", "cls_loss", "dfl_loss", "epoch_time_s", "eta_s"} <= set(extra)
        assert extra["total_epochs"] == 2
    assert [t["checkpoint_path"] for t in training] == [
        None, f"s3://{trained.bucket}/checkpoints/job-e2e/epoch-2.pt"]  # CHECKPOINT_EVERY=2

    validations = of_job(backend, "validation-results", "e2e")
    assert [v["epoch"] for v in validations] == [1, 2], "an epoch was reported twice or missed"
    for body in validations:
        assert body["task_type"] == "object_detection"
        assert set(body["metrics"]) == DETECTION_METRICS
        assert body["primary_metric_name"] == "mAP@0.5:0.95"
        assert body["primary_metric_value"] == body["metrics"]["mAP@0.5:0.95"]
        assert body["class_names"] == CLASSES
        assert list(body["per_class_metrics"]) == CLASSES
        assert all(set(m) == DETECTION_PER_CLASS for m in body["per_class_metrics"].values())
        assert sum(m["support"] for m in body["per_class_metrics"].values()) > 0
        assert isinstance(body["is_best"], bool) and body["overall_loss"] > 0
    assert sorted(validations[-1]["pr_curves"]["precision"]) == CLASSES

    completed = of_job(backend, "status", "e2e")[-1]
    assert DETECTION_METRICS <= set(completed["metrics"])
    assert completed["checkpoint_path"] == f"s3://{trained.bucket}/checkpoints/job-e2e/best.pt"
    assert all(call.headers["X-Internal-Auth"] == "test-token" for call in backend.calls)


def test_training_uploads_checkpoints_and_artifacts(trained: Trained) -> None:
    check_trained(trained)
    checkpoints = bucket_keys(trained.s3, trained.bucket, "checkpoints/job-e2e/")
    assert checkpoints == {"best.pt", "last.pt", "epoch-2.pt"}
    # A finished job holds weights only (Ultralytics' strip_optimizer: EMA weights in FP16).
    sizes = {}
    for name in checkpoints:
        checkpoint = read_checkpoint(trained, f"checkpoints/job-e2e/{name}")
        assert checkpoint["optimizer"] is None and checkpoint["epoch"] == -1, name
        assert checkpoint["model"].names and checkpoint["train_args"]["epochs"] == 2
        sizes[name] = trained.s3.client.head_object(
            Bucket=trained.bucket, Key=f"checkpoints/job-e2e/{name}")["ContentLength"]
    assert sum(sizes.values()) / (len(sizes) * sizes["epoch-2.pt"]) <= 1.1, sizes
    artifacts = bucket_keys(trained.s3, trained.bucket, "artifacts/job-e2e/")
    assert {"results.csv", "results.png", "results.json", "args.yaml", "confusion_matrix.png",
            "confusion_matrix_normalized.png", "BoxPR_curve.png", "BoxF1_curve.png"} <= artifacts
    report = json.loads(trained.s3.client.get_object(
        Bucket=trained.bucket, Key="artifacts/job-e2e/results.json")["Body"].read())
    assert list(report["per_class_metrics"]) == CLASSES and report["epochs"] == [1, 2]
    matrix = report["confusion_matrix"]  # of the final validation: rows = true class + background
    assert len(matrix) == len(CLASSES) + 1 and all(len(row) == len(matrix) for row in matrix)
    assert all(isinstance(v, int) for row in matrix for v in row)
    support = [report["per_class_metrics"][name]["support"] for name in CLASSES]
    assert [sum(row) for row in matrix[:-1]] == support  # each true object: found or missed
    assert not list(trained.cwd.iterdir()), "the job wrote into its current directory"


def test_one_mlflow_run_per_job_with_params_metrics_and_artifacts(trained: Trained) -> None:
    check_trained(trained)
    from mlflow.tracking import MlflowClient

    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "e2e"]
    assert len(runs) == 1, "Ultralytics' own MLflow integration logged a second run"
    run_ = runs[0]
    assert run_.info.run_name == "job-e2e" and run_.info.status == "FINISHED"
    assert run_.data.params["EPOCHS"] == "2" and run_.data.tags["framework"] == "ultralytics"
    assert run_.data.tags["framework_version"] == contract.installed_version("ultralytics")
    assert run_.data.tags["dataset_etag"]
    for name in ("best.pt", "epoch-2.pt"):  # the finished model, and a mid-run snapshot's copy
        local = trained.tmp / f"provenance-{name}"
        trained.s3.client.download_file(trained.bucket, f"checkpoints/job-e2e/{name}", str(local))
        ckpt = contract.load_torch_checkpoint(local, trusted=True)
        assert ckpt["provenance"]["dataset_etag"] == run_.data.tags["dataset_etag"], name
    client = MlflowClient(trained.mlflow.uri)
    history = client.get_metric_history(run_.info.run_id, "val_mAP_0.5_0.95")
    assert sorted(m.step for m in history) == [1, 2]
    logged = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"results.csv", "results.png", "confusion_matrix.png", "args.yaml"} <= logged


def test_training_makes_no_network_attempt_off_loopback(trained: Trained) -> None:
    check_trained(trained)
    assert not trained.guard_log.exists(), trained.guard_log.read_text()
    # The guard itself works: the same environment cannot reach a public address.
    probe_log = trained.tmp / "guard-probe.log"
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection("
                            "('example.com', 80), timeout=2)"], capture_output=True, text=True,
                           env=guarded(trained.env, probe_log), timeout=60)
    assert probe.returncode != 0 and "offline guard" in probe.stderr
    assert "example.com" in probe_log.read_text()


# --- starting from a checkpoint ----------------------------------------------------------------


def test_resume_after_a_kill_continues_at_the_next_epoch(trained: Trained) -> None:
    check_trained(trained)
    backend, log = trained.backend, trained.tmp / "guard-resume.log"
    env = guarded(trained.job_env("killed", EPOCHS="3", EXTRA_ARGS='{"plots": false}'), log)
    process = subprocess.Popen([sys.executable, str(TRAINER / "train.py")], cwd=TRAINER, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: of_job(backend, "training-metrics", "killed"), 300, 0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == contract.EXIT_SIGTERM, stderr[-3000:]
    assert statuses(backend, "killed")[-1] == "cancelled"
    done = max(t["epoch"] for t in of_job(backend, "training-metrics", "killed"))
    assert done < 3, "the job finished before it could be killed"
    last = read_checkpoint(trained, "checkpoints/job-killed/last.pt")
    assert last["optimizer"] is not None and last["epoch"] == done - 1  # Ultralytics: 0-based

    # The same job pointed at its weights-only epoch-1.pt: refused in one line naming last.pt.
    refused = run("train.py", guarded(trained.job_env(
        "killed-again", JOB_ID="killed", EPOCHS="3",
        CHECKPOINT_PATH="checkpoints/job-killed/epoch-1.pt"), log))
    assert refused.returncode == 3, refused.stderr[-3000:]
    failure = (trained.tmp / "killed-again" / "failure").read_text().strip()
    assert failure == ("CHECKPOINT_PATH=checkpoints/job-killed/epoch-1.pt holds weights only (no "
                       "optimizer state) and cannot resume job killed: resume from "
                       "checkpoints/job-killed/last.pt")

    resumed = run("train.py", guarded(trained.job_env(
        "resumed", EPOCHS="3", CHECKPOINT_PATH="checkpoints/job-killed/last.pt"), log))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert [t["epoch"] for t in of_job(backend, "training-metrics", "resumed")] == list(
        range(done + 1, 4))
    assert [v["epoch"] for v in of_job(backend, "validation-results", "resumed")] == list(
        range(done + 1, 4))
    csv = trained.s3.client.get_object(Bucket=trained.bucket,
                                       Key="artifacts/job-resumed/results.csv")["Body"].read()
    assert len(csv.decode().strip().splitlines()) == 1 + 3, "results.csv lost the first epochs"
    assert not log.exists(), log.read_text()


def test_a_finished_model_is_fine_tuned_from_epoch_one(trained: Trained) -> None:
    check_trained(trained)
    tuned = run("train.py", guarded(trained.job_env(
        "tuned", EPOCHS="1", EXTRA_ARGS='{"plots": false}', CHECKPOINT_PATH=f"s3://"
        f"{trained.bucket}/checkpoints/job-e2e/best.pt"), trained.tmp / "guard-tuned.log"))
    assert tuned.returncode == 0, tuned.stderr[-5000:]
    assert [t["epoch"] for t in of_job(trained.backend, "training-metrics", "tuned")] == [1]
    assert statuses(trained.backend, "tuned") == ["running", "completed"]


def test_evaluate_the_trained_checkpoint(trained: Trained) -> None:
    check_trained(trained)
    env = trained.job_env("eval", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt")
    evaluated = run("evaluate.py", guarded(env, trained.tmp / "guard-eval.log"))
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    assert set(json.loads(evaluated.stdout.strip().splitlines()[-1])) == DETECTION_METRICS
    keys = bucket_keys(trained.s3, trained.bucket, "artifacts/job-eval/evaluation/")
    assert {"metrics.json", "confusion_matrix.png", "BoxPR_curve.png", "BoxF1_curve.png"} <= keys
    report = json.loads(trained.s3.client.get_object(
        Bucket=trained.bucket, Key="artifacts/job-eval/evaluation/metrics.json")["Body"].read())
    assert report["split"] == "val" and list(report["per_class_metrics"]) == CLASSES
    assert len(report["confusion_matrix"]) == len(CLASSES) + 1
    [validation] = of_job(trained.backend, "validation-results", "eval")
    # best.pt is the last epoch whose primary metric improved (from scratch, often epoch 1)
    best_epoch = [v for v in of_job(trained.backend, "validation-results", "e2e")
                  if v["is_best"]][-1]["epoch"]
    assert validation["epoch"] == best_epoch and set(validation["metrics"]) == DETECTION_METRICS
    runs = [r for r in trained.mlflow.runs(EXPERIMENT) if r.data.tags.get("job_id") == "eval"]
    assert [r.info.run_name for r in runs] == ["eval-eval"]


def test_predict_with_the_trained_checkpoint_on_a_prefix(trained: Trained) -> None:
    check_trained(trained)
    images = sorted(trained.tmp.glob("e2e/cache/**/images/val/*.jpg"))[:3]
    names = ["a.jpg", "Bild-ü.JPG", "c.png"]
    for image, name in zip(images, names, strict=True):
        trained.s3.client.upload_file(str(image), trained.bucket, f"inputs/{name}")
    env = trained.job_env("predict", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt",
                          INPUT_PATH="inputs/", CONF_THRESHOLD="0.0")
    predicted = run("predict.py", guarded(env, trained.tmp / "guard-predict.log"))
    assert predicted.returncode == 0, predicted.stderr[-5000:]
    prefix = "artifacts/job-predict/predictions/"
    keys = bucket_keys(trained.s3, trained.bucket, prefix)
    output = json.loads(trained.s3.client.get_object(
        Bucket=trained.bucket, Key=prefix + "predictions.json")["Body"].read())
    assert output["class_names"] == CLASSES and output["task_type"] == "object_detection"
    assert sorted(p["image"] for p in output["predictions"]) == sorted(names)
    for prediction in output["predictions"]:
        assert f"annotated/{prediction['annotated']}" in keys
        for detection in prediction["detections"]:
            x1, y1, x2, y2 = detection["box_xyxy"]
            assert 0 <= x1 <= x2 <= prediction["width"] and 0 <= y1 <= y2 <= prediction["height"]
            assert detection["class_name"] == CLASSES[detection["class_id"]]
            assert 0.0 <= detection["confidence"] <= 1.0


# --- export -------------------------------------------------------------------------------------

# Most |exported - PyTorch| on the raw head outputs, times their largest magnitude (at least 1):
# boxes are in input pixels, and the exporter fuses convolutions with their batch norms.
RELATIVE_TOLERANCE = 1e-5
# Runs in a subprocess (Ultralytics configures itself at import): the archives' models through
# onnxruntime / torch.jit.load, fed as metadata.json describes (letterbox, RGB, 0-1, NCHW, the
# batch its input shape allows), and YOLO(checkpoint).model on the very same tensors.
EXPORT_PROBE = r"""
import json, sys, tempfile, warnings, zipfile
from pathlib import Path
import cv2, numpy as np, torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox

checkpoint, images, archives = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
reference = YOLO(checkpoint).model.float().eval()

def letterbox(bgr, steps):
    size = steps["resize"]["height"]
    h, w = bgr.shape[:2]
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    if (nw, nh) != (w, h):
        bgr = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - nw) / 2, (size - nh) / 2
    pad = steps["pad_value"]
    return cv2.copyMakeBorder(bgr, round(dh - 0.1), round(dh + 0.1), round(dw - 0.1),
                              round(dw + 0.1), cv2.BORDER_CONSTANT, value=(pad, pad, pad))

def preprocess(path, steps):
    bgr = cv2.imread(path)[:, 16:112]  # 96 wide: the letterbox pads
    boxed = letterbox(bgr, steps)
    ultralytics = LetterBox((steps["resize"]["height"],) * 2, auto=False)(image=bgr)
    gap = int(np.abs(boxed.astype(int) - ultralytics.astype(int)).max())
    rgb = boxed[..., ::-1] if steps["channel_order"] == "RGB" else boxed
    x = rgb.astype(np.float32) * np.float32(steps["rescale_factor"])
    x = (x - np.float32(steps["mean"])) / np.float32(steps["std"])
    return x.transpose(2, 0, 1), gap

def raw(x):
    with torch.inference_mode():
        out = reference(torch.from_numpy(x))
    first = out[0] if isinstance(out, (list, tuple)) else out
    return [t.numpy() for t in (first if isinstance(first, (list, tuple)) else [first])]

report = {}
for archive in archives:
    folder = Path(tempfile.mkdtemp())
    zipfile.ZipFile(archive).extractall(folder)
    meta = json.loads((folder / "metadata.json").read_text())
    model_file = str(folder / meta["file"])
    if meta["format"] == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(model_file, providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {meta["input"]["name"]: x})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(model_file)
        def run(x):
            with torch.inference_mode():
                out = module(torch.from_numpy(x))
            return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
    inputs, gaps = zip(*(preprocess(p, meta["preprocessing"]) for p in images))
    x = np.stack(inputs)
    step = len(x) if meta["input"]["shape"][0] == -1 else 1
    diff, scale, calls = 0.0, 1.0, 0
    for start in range(0, len(x), step):
        batch = x[start:start + step]
        expected, actual = raw(batch), run(batch)
        calls += 1
        assert [a.shape for a in actual] == [e.shape for e in expected], meta["format"]
        diff = max([diff] + [float(np.abs(a - e).max()) for a, e in zip(actual, expected)])
        scale = max([scale] + [float(np.abs(e).max()) for e in expected])
    report[meta["format"]] = {"max_abs_diff": diff, "scale": scale, "calls": calls,
                              "letterbox_gap": max(gaps), "shape": list(x.shape)}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def exported(trained: Trained) -> dict[str, subprocess.CompletedProcess]:
    """The e2e job's best.pt exported to ONNX (any batch) and TorchScript (a batch of 1)."""
    check_trained(trained)
    return {fmt: run("export.py", guarded(trained.job_env(
        f"export-{fmt}", CHECKPOINT_PATH="checkpoints/job-e2e/best.pt", EXPORT_FORMAT=fmt,
        DYNAMIC_BATCH=str(fmt == "onnx").lower()), trained.tmp / "guard-export.log"))
        for fmt in ("onnx", "torchscript")}


def export_archive(trained: Trained, fmt: str) -> Path:
    archive = trained.tmp / "archives" / f"export-{fmt}.zip"
    archive.parent.mkdir(exist_ok=True)
    trained.s3.client.download_file(trained.bucket, f"artifacts/job-export-{fmt}/export/"
                                    f"export-{fmt}.zip", str(archive))
    return archive


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_uploads_one_archive_with_the_model_and_its_metadata(
        trained: Trained, exported: dict, fmt: str) -> None:
    import jsonschema

    result = exported[fmt]
    assert result.returncode == 0, result.stderr[-5000:]
    job_id = f"export-{fmt}"
    assert statuses(trained.backend, job_id) == ["running", "completed"]
    assert bucket_keys(trained.s3, trained.bucket, f"artifacts/job-{job_id}/") == {
        f"export/export-{fmt}.zip", contract.JOURNAL_NAME}
    assert result.stdout.strip() == (f"s3://{trained.bucket}/artifacts/job-{job_id}/export/"
                                     f"export-{fmt}.zip")
    with zipfile.ZipFile(export_archive(trained, fmt)) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        assert sorted(archive.namelist()) == sorted(["metadata.json", metadata["file"]])
    schema = json.loads(EXPORT_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(metadata)] == []
    batch = -1 if fmt == "onnx" else 1
    assert metadata["format"] == fmt and metadata["file"] == f"model.{fmt}"
    assert metadata["task_type"] == "object_detection" and metadata["class_names"] == CLASSES
    assert metadata["input"] == {"name": "images", "shape": [batch, 3, 128, 128],
                                 "dtype": "float32", "layout": "NCHW"}
    anchors = sum((128 // stride) ** 2 for stride in (8, 16, 32))
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
        ("output0", [batch, 4 + len(CLASSES), anchors])]
    steps = metadata["preprocessing"]
    assert steps["letterbox"] is True and steps["pad_value"] == 114
    assert steps["channel_order"] == "RGB" and steps["rescale_factor"] == pytest.approx(1 / 255)
    assert steps["mean"] == [0, 0, 0] and steps["std"] == [1, 1, 1]
    assert metadata["source_checkpoint"]["path"] == "checkpoints/job-e2e/best.pt"
    assert metadata["source_checkpoint"]["model_name"] == "yolo11n"
    assert metadata["framework"] == {"name": "Ultralytics", "package": "ultralytics",
                                     "version": importlib.metadata.version("ultralytics")}
    assert metadata["exporter"]["name"] == "ultralytics"
    assert metadata["verification"]["status"] == "passed"
    assert metadata["verification"]["batch"] == (2 if fmt == "onnx" else 1)
    assert metadata["dynamic_batch"] is (fmt == "onnx") and metadata["job_id"] == job_id
    assert not (trained.tmp / "guard-export.log").exists(), (
        trained.tmp / "guard-export.log").read_text()


def test_exported_models_reproduce_the_pytorch_outputs(trained: Trained, exported: dict) -> None:
    for fmt, result in exported.items():
        assert result.returncode == 0, f"{fmt}: {result.stderr[-5000:]}"
    images = sorted(trained.tmp.glob("e2e/cache/**/images/val/*.jpg"))
    assert len(images) == 8
    best = trained.tmp / "archives" / "best.pt"
    best.parent.mkdir(exist_ok=True)
    trained.s3.client.download_file(trained.bucket, "checkpoints/job-e2e/best.pt", str(best))
    env = {**clean_environ(), "YOLO_CONFIG_DIR": str(trained.tmp / "probe-config"),
           "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "OMP_NUM_THREADS": "2"}
    probe = subprocess.run(
        [sys.executable, "-c", EXPORT_PROBE, str(best), json.dumps([str(p) for p in images]),
         *(str(export_archive(trained, fmt)) for fmt in ("onnx", "torchscript"))],
        cwd=trained.tmp, env=guarded(env, trained.tmp / "guard-probe-export.log"),
        capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-5000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    for fmt in ("onnx", "torchscript"):
        assert report[fmt]["shape"] == [8, 3, 128, 128]
        tolerance = RELATIVE_TOLERANCE * report[fmt]["scale"]
        assert report[fmt]["max_abs_diff"] <= tolerance, (fmt, report[fmt])
        # metadata.json's letterbox, rebuilt with OpenCV alone, is Ultralytics' own
        assert report[fmt]["letterbox_gap"] <= 1, (fmt, report[fmt])
    assert report["onnx"]["calls"] == 1, "a dynamic-batch model takes every image at once"
    assert report["torchscript"]["calls"] == 8, "a fixed batch of 1: one image per call"


ABSENT_TOOLCHAINS = {  # EXPORT_FORMAT -> the job's one line (DEVICE=cpu)
    "openvino": "EXPORT_FORMAT=openvino needs the openvino package, which this machine does not "
                "have",
    "engine": "EXPORT_FORMAT=engine needs the tensorrt package and a CUDA GPU, which this "
              "machine does not have",
}


@pytest.mark.parametrize("fmt", ABSENT_TOOLCHAINS)
def test_export_to_an_absent_toolchain_fails_at_once(fmt: str, s3: S3Server,
                                                     backend: RecordingBackend, job_env: dict,
                                                     tmp_path: Path) -> None:
    reason = ABSENT_TOOLCHAINS[fmt]
    key = "checkpoints/job-x/best.pt"
    s3.put_bytes(key, b"never read: the check comes first")
    # Packages that fail to import, as when they are not installed (whatever this machine has).
    absent = tmp_path / "absent"
    for package in ("openvino", "tensorrt"):
        (absent / package).mkdir(parents=True)
        (absent / package / "__init__.py").write_text(
            f"raise ImportError(\"No module named '{package}'\")\n")
    log = tmp_path / "guard.log"
    env = guarded({**job_env, "CHECKPOINT_PATH": key, "EXPORT_FORMAT": fmt,
                   "MLFLOW_TRACKING_URI": closed_port_url()}, log)
    env["PYTHONPATH"] += f":{absent}"
    started = time.monotonic()
    result = run("export.py", env)
    assert result.returncode == contract.EXIT_CONFIG, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(reason), result.stderr[-3000:]
    assert backend.statuses() == ["running", "failed"]
    assert backend.bodies("status")[-1]["error"] == reason
    assert (tmp_path / "work" / "failure").read_text().strip() == reason
    assert not (tmp_path / "work" / "inputs").exists(), "the checkpoint was downloaded"
    assert not (tmp_path / "work" / "export").exists()
    journal = f"artifacts/job-{job_env['JOB_ID']}/{contract.JOURNAL_NAME}"
    assert set(s3.keys("artifacts/")) <= {journal}
    assert not log.exists(), log.read_text()
    assert time.monotonic() - started < 60


# --- the other tasks -----------------------------------------------------------------------------


def test_segmentation_short_run(s3: S3Server, backend: RecordingBackend, job_env: dict,
                                tmp_path: Path) -> None:
    s3.put_file("datasets/shapes-seg.zip", sample_zip(tmp_path, "segment", "shapes-seg", 8, 4))
    env = {**job_env, **TINY, "DATASET_ID": "shapes-seg", "MODEL_NAME": "yolo11n-seg",
           "EPOCHS": "1", "EXTRA_ARGS": '{"plots": false}'}
    result = run("train.py", guarded(env, tmp_path / "guard.log"))
    assert result.returncode == 0, result.stderr[-5000:]
    assert backend.statuses() == ["running", "completed"]
    [validation] = backend.bodies("validation-results")
    assert validation["task_type"] == "instance_segmentation"
    _, metrics, per_class = contract.TASK_METRICS["instance_segmentation"]
    assert set(validation["metrics"]) == set(metrics) and "mAP50-95(M)" in metrics
    assert validation["primary_metric_name"] == "mAP50-95(M)"
    assert validation["primary_metric_value"] == validation["metrics"]["mAP50-95(M)"]
    assert all(set(m) == set(per_class) for m in validation["per_class_metrics"].values())
    assert "seg_loss" in backend.bodies("training-metrics")[0]["extra_metrics"]
    assert not (tmp_path / "guard.log").exists()

    image = next((tmp_path / "work" / "cache").rglob("val_00000.jpg"))
    s3.put_file("inputs/one.jpg", image)
    best = f"checkpoints/job-{job_env['JOB_ID']}/best.pt"
    predicted = run("predict.py", guarded({
        **job_env, "JOB_ID": "seg-predict", "CHECKPOINT_PATH": best, "INPUT_PATH": "inputs/one.jpg",
        "CONF_THRESHOLD": "0.0", "WORK_DIR": str(tmp_path / "predict")}, tmp_path / "guard.log"))
    assert predicted.returncode == 0, predicted.stderr[-5000:]
    output = json.loads(s3.get_bytes("artifacts/job-seg-predict/predictions/predictions.json"))
    detections = output["predictions"][0]["detections"]
    assert all(len(d["polygon"]) >= 3 for d in detections if "polygon" in d)
    assert all("polygon" in d for d in detections)


def test_classification_short_run(s3: S3Server, backend: RecordingBackend, job_env: dict,
                                  tmp_path: Path) -> None:
    s3.put_file("datasets/shapes-cls.zip", sample_zip(tmp_path, "classify", "shapes-cls", 12, 6))
    env = {**job_env, **TINY, "DATASET_ID": "shapes-cls", "TASK_TYPE": "image_classification",
           "IMAGE_SIZE": "64", "EPOCHS": "1", "EXTRA_ARGS": '{"plots": false}'}
    result = run("train.py", guarded(env, tmp_path / "guard.log"))
    assert result.returncode == 0, result.stderr[-5000:]
    assert backend.statuses() == ["running", "completed"]
    [validation] = backend.bodies("validation-results")
    assert validation["task_type"] == "image_classification"
    assert validation["primary_metric_name"] == "accuracy"
    assert {"accuracy", "precision", "recall", "f1_score", "top5_accuracy"} <= set(
        validation["metrics"])
    assert list(validation["per_class_metrics"]) == CLASSES
    assert all(set(m) == {"precision", "recall", "f1_score", "support"}
               for m in validation["per_class_metrics"].values())
    assert sum(map(sum, validation["confusion_matrix"])) == 6
    assert {"best.pt", "last.pt", "epoch-1.pt"} <= {k.rsplit("/", 1)[-1] for k in s3.keys(
        f"checkpoints/job-{job_env['JOB_ID']}/")}


# --- bad input: one line, `failed`, non-zero exit ------------------------------------------------


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")
BAD_INPUTS = {
    "dataset without data.yaml": (
        {"DATASET_ID": "no-yaml"},
        {"no-yaml/images/train/a.jpg": JPEG, "no-yaml/labels/train/a.txt": b"0 .5 .5 .2 .2\n"},
        contract.EXIT_DATA, "dataset is in no accepted format (found: images/, labels/); "
        "accepted: platform_annotations"),
    "data.yaml naming a missing folder": (
        {"DATASET_ID": "missing-val"},
        {"data.yaml": b"names: [a]\ntrain: images/train\nval: images/nowhere\n",
         "images/train/a.jpg": JPEG, "labels/train/a.txt": b"0 .5 .5 .2 .2\n"},
        contract.EXIT_DATA, "val folder 'images/nowhere' does not exist"),
    "unknown EXTRA_ARGS key": (
        {"DATASET_ID": "sample", "EXTRA_ARGS": '{"mosaic": 0.5, "lr_zero": 0.1}'},
        None, contract.EXIT_CONFIG, "EXTRA_ARGS.lr_zero is not an option of this trainer"),
    "PRETRAINED=true offline": (
        {"DATASET_ID": "sample", "PRETRAINED": "true"},
        None, contract.EXIT_CONFIG, "PRETRAINED=true: yolo11n.pt could not be downloaded"),
    "PRETRAINED=true with OFFLINE=true": (
        {"DATASET_ID": "sample", "PRETRAINED": "true", "OFFLINE": "true"},
        None, contract.EXIT_CONFIG, "OFFLINE=true forbids downloading it"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_with_one_line(case: str, s3: S3Server, backend: RecordingBackend,
                                       job_env: dict, tmp_path: Path) -> None:
    settings, members, exit_code, reason = BAD_INPUTS[case]
    if members is not None:
        s3.put_bytes(f"datasets/{settings['DATASET_ID']}.zip", zip_of(members))
    log = tmp_path / "guard.log"
    started = time.monotonic()
    # No tracking: these jobs fail before any epoch, and MLflow's client only adds seconds.
    env = {**job_env, **TINY, "MLFLOW_TRACKING_URI": closed_port_url(), **settings}
    result = run("train.py", guarded(env, log))
    assert result.returncode == exit_code, result.stderr[-3000:]
    # EXTRA_ARGS is checked with the settings, before the job reports `running`.
    assert backend.statuses() == (["failed"] if "EXTRA_ARGS" in settings
                                  else ["running", "failed"])
    error = backend.bodies("status")[-1]["error"]
    assert reason in error and "\n" not in error and "Traceback" not in result.stderr
    assert (tmp_path / "work" / "failure").read_text().strip() == error
    assert not s3.keys("checkpoints/"), "a failed job uploaded checkpoints"
    if settings.get("OFFLINE") == "true" or settings.get("PRETRAINED") != "true":
        assert not log.exists(), log.read_text()  # failed without any network attempt
    assert time.monotonic() - started < 120
