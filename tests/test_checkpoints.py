"""Checkpoint storage (docs/checkpoints.md): one resumable last.pt, weights-only epoch-N.pt and
best.pt, a finished job holding weights only, KEEP_EPOCH_CHECKPOINTS, resume refused from a
weights-only file. The contract alone on a real S3 server (fast), then the template's trainer
(trainers/pytorch, a render of template/) training a tiny CNN against it.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.servers import REPO, RecordingBackend, S3Server, closed_port_url, wait_until

PYTORCH = REPO / "trainers" / "pytorch"


# --- the contract: the publishing rule and retention ----------------------------------------------


def contract_env(s3: S3Server, backend: RecordingBackend, tmp_path: Path, **extra: str) -> dict:
    return {**clean_environ(), **s3.env(), **backend.env("job-1"), "DATASET_ID": "ds",
            "WORK_DIR": str(tmp_path / "work"), "MLFLOW_TRACKING_URI": closed_port_url(),
            **extra}


def three_epochs(utils, best_epoch: int = 2):
    """A work function: epoch N's resumable checkpoint is b"full-N", its weights b"w-N"."""

    def weights_only(source: Path, dest: Path) -> None:
        dest.write_bytes(source.read_bytes().replace(b"full-", b"w-"))

    def work(job):
        last = job.work_dir / "last.pt"
        for epoch in (1, 2, 3):
            with utils.atomic_path(last) as tmp:
                tmp.write_bytes(f"full-{epoch}".encode())
            job.end_epoch(epoch, 3, utils.TrainingMetrics(loss=1.0), checkpoint=last,
                          weights=weights_only, is_best=epoch == best_epoch)
        return utils.JobResult(checkpoint_path=job.best_checkpoint_uri)

    return work


def meta(s3: S3Server, key: str) -> dict[str, str]:
    return s3.client.head_object(Bucket=s3.bucket, Key=key)["Metadata"]


def test_a_completed_job_keeps_weights_only_and_its_newest_epochs(
        utils_module, s3: S3Server, backend: RecordingBackend, tmp_path: Path, caplog) -> None:
    utils = utils_module
    env = contract_env(s3, backend, tmp_path, KEEP_EPOCH_CHECKPOINTS="1")
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert utils.run_job("train", utils.TRAIN_SETTINGS, three_epochs(utils),
                             framework="test", argv=[], environ=env) == utils.EXIT_OK
    prefix = "checkpoints/job-job-1/"
    assert s3.keys(prefix) == [prefix + n for n in ("best.pt", "epoch-3.pt", "last.pt")]
    assert s3.get_bytes(prefix + "best.pt") == b"w-2"  # best stays, its epoch-2.pt is gone
    assert s3.get_bytes(prefix + "epoch-3.pt") == b"w-3"
    assert s3.get_bytes(prefix + "last.pt") == b"w-3"  # completed: last.pt is weights only
    assert meta(s3, prefix + "last.pt") == {"epoch": "3", "checkpoint": "weights"}
    # last.pt crossed the network as the full checkpoint every epoch, and once more as a copy.
    puts = [path for method, path in s3.requests if method == "PUT"]
    assert sum(path.endswith("/last.pt") for path in puts) == 4
    assert [p for p in s3.copies if p.endswith("/last.pt")] == [f"/{s3.bucket}/{prefix}last.pt"]
    deleted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deleted")]
    assert [line.split()[1].rsplit("/", 1)[1] for line in deleted] == ["epoch-1.pt",
                                                                       "epoch-2.pt"]
    metrics = backend.bodies("training-metrics")
    assert [m["checkpoint_path"].rsplit("/", 1)[1] for m in metrics] == [
        "epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]


def test_keep_zero_uploads_no_epoch_checkpoint(utils_module, s3: S3Server,
                                                backend: RecordingBackend, tmp_path: Path) -> None:
    utils = utils_module
    env = contract_env(s3, backend, tmp_path, KEEP_EPOCH_CHECKPOINTS="0")
    assert utils.run_job("train", utils.TRAIN_SETTINGS, three_epochs(utils, best_epoch=3),
                         framework="test", argv=[], environ=env) == utils.EXIT_OK
    prefix = "checkpoints/job-job-1/"
    assert s3.keys(prefix) == [prefix + "best.pt", prefix + "last.pt"]
    assert s3.get_bytes(prefix + "best.pt") == s3.get_bytes(prefix + "last.pt") == b"w-3"
    assert [m["checkpoint_path"] for m in backend.bodies("training-metrics")] == [None] * 3


def test_a_cancelled_job_keeps_its_resumable_last(utils_module, s3: S3Server,
                                                  backend: RecordingBackend,
                                                  tmp_path: Path) -> None:
    utils = utils_module
    work = three_epochs(utils)

    def cancelled(job):
        work(job)
        raise utils.JobCancelled("cancelled by the platform after epoch 3")

    env = contract_env(s3, backend, tmp_path)
    assert utils.run_job("train", utils.TRAIN_SETTINGS, cancelled, framework="test", argv=[],
                         environ=env) == utils.EXIT_CANCELLED
    prefix = "checkpoints/job-job-1/"
    assert s3.get_bytes(prefix + "last.pt") == b"full-3"
    assert meta(s3, prefix + "last.pt") == {"epoch": "3", "checkpoint": "resumable"}
    assert [s3.get_bytes(prefix + f"epoch-{n}.pt") for n in (1, 2, 3)] == [b"w-1", b"w-2", b"w-3"]


def test_a_failing_weights_converter_fails_the_job(utils_module, s3: S3Server,
                                                    backend: RecordingBackend,
                                                    tmp_path: Path) -> None:
    utils = utils_module

    def broken(source: Path, dest: Path) -> None:
        raise ValueError("not a checkpoint")

    def work(job):
        last = job.work_dir / "last.pt"
        last.write_bytes(b"full-1")
        job.end_epoch(1, 1, utils.TrainingMetrics(loss=1.0), checkpoint=last, weights=broken)

    env = contract_env(s3, backend, tmp_path)
    assert utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test", argv=[],
                         environ=env) == utils.EXIT_DATA
    assert backend.bodies("status")[-1]["error"] == (
        "could not make the weights-only form of checkpoints/job-job-1/epoch-1.pt: "
        "ValueError: not a checkpoint")


@pytest.mark.parametrize("kind", ["minio", "local"])
def test_storage_delete(utils_module, s3: S3Server, tmp_path: Path, kind: str) -> None:
    storage = (utils_module.Storage("minio", s3.bucket, endpoint=s3.endpoint,
                                    access_key=s3.env()["MINIO_ACCESS_KEY"],
                                    secret_key=s3.env()["MINIO_SECRET_KEY"])
               if kind == "minio" else utils_module.Storage("local", "b", local_root=tmp_path))
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    storage.upload(source, "checkpoints/job-1/epoch-1.pt")
    storage.delete("checkpoints/job-1/epoch-1.pt")
    storage.delete("checkpoints/job-1/epoch-1.pt")  # already gone: not an error
    assert storage.list("checkpoints/") == []


# --- the template's trainer end to end ------------------------------------------------------------


@dataclass
class Bucket:
    s3: S3Server
    bucket: str
    backend: RecordingBackend
    tmp: Path
    result: subprocess.CompletedProcess | None = None  # the module's one completed job

    def env(self, job_id: str, work: str | None = None, **settings: str) -> dict[str, str]:
        return {**clean_environ(), **self.s3.env(), "STORAGE_BUCKET": self.bucket,
                **self.backend.env(job_id), "WORK_DIR": str(self.tmp / (work or job_id)),
                "MLFLOW_TRACKING_URI": closed_port_url(), "DATASET_ID": "sample",
                "DEVICE": "cpu", "NUM_WORKERS": "0", "IMAGE_SIZE": "32", "BATCH_SIZE": "8",
                "PRETRAINED": "false", "OMP_NUM_THREADS": "1", **settings}

    def of_job(self, route: str, job_id: str) -> list[dict]:
        return [b for b in self.backend.bodies(route) if b.get("job_id") == job_id]

    def keys(self, job_id: str) -> list[str]:
        prefix = f"checkpoints/job-{job_id}/"
        pages = self.s3.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for p in pages for o in p.get("Contents", []))

    def download(self, key: str) -> Path:
        dest = self.tmp / "downloads" / uuid.uuid4().hex / Path(key).name
        dest.parent.mkdir(parents=True)
        self.s3.client.download_file(self.bucket, key, str(dest))
        return dest


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script], cwd=PYTORCH, env=env, capture_output=True,
                          text=True, timeout=600)


def load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    tmp = tmp_path_factory.mktemp("checkpoints")
    bucket = f"checkpoints-{uuid.uuid4().hex[:8]}"
    s3_server.start()
    s3_server.client.create_bucket(Bucket=bucket)
    subprocess.run([sys.executable, str(PYTORCH / "sample_data.py"), str(tmp / "data"),
                    "--train", "4", "--val", "2"], check=True, capture_output=True, timeout=120)
    s3_server.client.upload_file(str(tmp / "data" / "datasets" / "sample.zip"), bucket,
                                 "datasets/sample.zip")
    trained = Bucket(s3_server, bucket, RecordingBackend(), tmp)
    trained.result = run("train.py", trained.env("done", EPOCHS="3"))
    yield trained
    trained.backend.close()


TRAINING_STATE = {"optimizer", "scheduler", "best_value"}


@pytest.mark.slow
def test_a_completed_run_leaves_only_weights_only_checkpoints(trained: Bucket) -> None:
    assert trained.result.returncode == 0, trained.result.stderr[-3000:]
    names = trained.keys("done")
    assert names == ["best.pt", "epoch-1.pt", "epoch-2.pt", "epoch-3.pt", "last.pt"]
    sizes = {}
    for name in names:
        path = trained.download(f"checkpoints/job-done/{name}")
        checkpoint = load(path)
        assert checkpoint["format"] == "vision-platform/pytorch/2"
        assert not TRAINING_STATE & set(checkpoint), f"{name} holds training state"
        assert {"model", "class_names", "model_name", "image_size", "mean", "std", "task_type",
                "config", "versions", "epoch"} <= set(checkpoint)
        sizes[name] = path.stat().st_size
    assert load(trained.download("checkpoints/job-done/last.pt"))["epoch"] == 3
    footprint = sum(sizes.values()) / (len(sizes) * sizes["epoch-3.pt"])
    assert footprint <= 1.1, sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["epoch-1.pt", "best.pt"])
def test_evaluate_predict_export_and_fine_tune_from_weights_only(trained: Bucket,
                                                                  name: str) -> None:
    assert trained.result.returncode == 0, trained.result.stderr[-3000:]
    source = f"checkpoints/job-done/{name}"
    tag = name.split(".")[0]
    evaluated = run("evaluate.py", trained.env(f"eval-{tag}", CHECKPOINT_PATH=source))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert trained.of_job("validation-results", f"eval-{tag}")
    image = next((trained.tmp / "done" / "cache").rglob("*.png"), None) or next(
        p for p in (trained.tmp / "done" / "cache").rglob("*") if p.suffix in (".jpg", ".jpeg"))
    trained.s3.client.upload_file(str(image), trained.bucket, f"inputs/{tag}/{image.name}")
    predicted = run("predict.py", trained.env(f"predict-{tag}", CHECKPOINT_PATH=source,
                                              INPUT_PATH=f"inputs/{tag}/"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    exported = run("export.py", trained.env(f"export-{tag}", CHECKPOINT_PATH=source,
                                            EXPORT_FORMAT="onnx"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    tuned = run("train.py", trained.env(f"tuned-{tag}", EPOCHS="1", CHECKPOINT_PATH=source))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "fine-tuning from a finished model" in tuned.stderr
    assert [t["epoch"] for t in trained.of_job("training-metrics", f"tuned-{tag}")] == [1]


@pytest.mark.slow
def test_keep_epoch_checkpoints_1_leaves_the_newest(trained: Bucket) -> None:
    result = run("train.py", trained.env("kept", EPOCHS="3", KEEP_EPOCH_CHECKPOINTS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained.keys("kept") == ["best.pt", "epoch-3.pt", "last.pt"]
    assert "deleted s3://" in result.stderr and "epoch-1.pt (KEEP_EPOCH_CHECKPOINTS=1)" in (
        result.stderr)


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_last_and_only_last_resumes(trained: Bucket) -> None:
    env = trained.env("killed", EPOCHS="500")
    process = subprocess.Popen([sys.executable, "train.py"], cwd=PYTORCH, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(trained.of_job("training-metrics", "killed")) >= 2, 300,
                          0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    done = max(t["epoch"] for t in trained.of_job("training-metrics", "killed"))
    last = load(trained.download("checkpoints/job-killed/last.pt"))
    assert last["epoch"] == done and TRAINING_STATE <= set(last), "last.pt is not resumable"
    epoch_one = load(trained.download("checkpoints/job-killed/epoch-1.pt"))
    assert not TRAINING_STATE & set(epoch_one)

    # The same job again on a new machine, pointed at its epoch-1.pt: refused, in one line.
    refused = run("train.py", trained.env("killed", work="killed-epoch", EPOCHS="500",
                                          CHECKPOINT_PATH="checkpoints/job-killed/epoch-1.pt"))
    assert refused.returncode == 3, refused.stderr[-3000:]
    error = (trained.tmp / "killed-epoch" / "failure").read_text().strip()
    assert error == ("CHECKPOINT_PATH=checkpoints/job-killed/epoch-1.pt holds weights only (no "
                     "optimizer state) and cannot resume job killed: resume from "
                     "checkpoints/job-killed/last.pt")
    assert "Traceback" not in refused.stderr

    # ... and at its last.pt: it continues at the next epoch.
    resumed = run("train.py", trained.env("killed", work="killed-resume", EPOCHS=str(done + 2),
                                          CHECKPOINT_PATH="checkpoints/job-killed/last.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {done}" in resumed.stderr
    journal = (trained.tmp / "killed-resume" / "callbacks.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in journal]
    assert [e["body"]["epoch"] for e in events if e["route"] == "training-metrics"] == [
        done + 1, done + 2]


@pytest.mark.slow
def test_a_format_1_checkpoint_still_loads(trained: Bucket) -> None:
    """Before weights-only checkpoints every file was resumable and said format 1."""
    import torch

    assert trained.result.returncode == 0, trained.result.stderr[-3000:]
    checkpoint = load(trained.download("checkpoints/job-done/best.pt"))
    old = trained.tmp / "format-1.pt"
    torch.save({**checkpoint, "format": "vision-platform/pytorch/1"}, old)
    trained.s3.client.upload_file(str(old), trained.bucket, "checkpoints/job-old/last.pt")
    evaluated = run("evaluate.py", trained.env("eval-old",
                                               CHECKPOINT_PATH="checkpoints/job-old/last.pt"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
