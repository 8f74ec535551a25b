"""Reliability under hostile conditions (issue 19): a total deadline on every call, one job per
work dir, finite numbers, divergence is a failure, a `failed` status even when the work dir is
unusable, URLs checked as settings.

Real servers on loopback (tests/support/servers.py): a backend that trickles its answers a byte
at a time, an S3 endpoint behind a trickling proxy, an "MLflow" that trickles; the PyTorch
trainer (the template's render) as the job. Each test asserts the exit code, the one line, what
the backend received and a wall-time bound.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.servers import LOOPBACK, RecordingBackend, S3Server, wait_until

REPO = Path(__file__).resolve().parents[1]
PYTORCH = REPO / "trainers" / "pytorch"
DATASET = "sample"


@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pytorch-sample")
    subprocess.run([sys.executable, str(PYTORCH / "sample_data.py"), str(root), "--train", "4",
                    "--val", "2"], check=True, capture_output=True, timeout=120)
    return root / "datasets" / "sample.zip"


def job_env(tmp_path: Path, s3: S3Server, backend: RecordingBackend, job_id: str = "job-1",
            **extra: str) -> dict[str, str]:
    """A PyTorch training job on this test's servers; MLflow's store is local (in WORK_DIR)."""
    return {**clean_environ(), **s3.env(), **backend.env(job_id),
            "WORK_DIR": str(tmp_path / "work"), "DEVICE": "cpu", "NUM_WORKERS": "0",
            "DATASET_ID": DATASET, "EPOCHS": "2", "BATCH_SIZE": "8", "IMAGE_SIZE": "32",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def start(env: dict[str, str], trainer: Path = PYTORCH) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py"], cwd=trainer, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def train(env: dict[str, str], trainer: Path = PYTORCH,
          timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "train.py"], cwd=trainer, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def dataset_reads(s3: S3Server) -> list[tuple[str, str]]:
    return [(m, p) for m, p in s3.requests if p.endswith(f"/datasets/{DATASET}.zip")]


# --- finite numbers, framework ranges, URLs: settings, checked before any work -------------------

@pytest.mark.parametrize(("name", "value"), [
    ("LEARNING_RATE", "nan"), ("LEARNING_RATE", "inf"), ("LEARNING_RATE", "-inf"),
    ("CALLBACK_FLUSH_S", "nan"), ("SHUTDOWN_GRACE_S", "inf"),
])
def test_a_non_finite_number_fails_before_any_download(name, value, tmp_path, s3, backend,
                                                       sample_zip):
    s3.put_file(f"datasets/{DATASET}.zip", sample_zip)
    s3.requests.clear()
    result, took = train(job_env(tmp_path, s3, backend, **{name: value}))
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert f"{name}='{value}' is not a finite number" in line
    assert "Traceback" not in result.stderr
    assert backend.statuses() == ["failed"]
    assert f"{name}='{value}'" in backend.bodies("status")[0]["error"]
    assert not dataset_reads(s3), "the dataset was read before the settings were checked"
    assert took < 20


def test_ultralytics_learning_rate_is_checked_against_its_range_up_front(tmp_path, s3, backend):
    from ultralytics.cfg import CFG_FRACTION_KEYS

    # LEARNING_RATE is Ultralytics' lr0, one of its fractions (in [0, 1]).
    options = (REPO / "trainers" / "ultralytics" / "options.py").read_text()
    assert '"lr0": "LEARNING_RATE"' in options and "lr0" in CFG_FRACTION_KEYS
    env = job_env(tmp_path, s3, backend, LEARNING_RATE="5", MODEL_NAME="yolo11n")
    result, took = train(env, REPO / "trainers" / "ultralytics")
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert "LEARNING_RATE='5' is above the maximum 1" in line
    assert backend.statuses() == ["failed"] and not dataset_reads(s3)
    assert took < 30


@pytest.mark.parametrize(("name", "url", "shown"), [
    ("MINIO_ENDPOINT", "127.0.0.1:9000", "'127.0.0.1:9000' is not a URL with a scheme"),
    ("MINIO_ENDPOINT", "http://", "'http://' names no host"),
    ("MLFLOW_TRACKING_URI", "localhost:5000", "<redacted> is not a URL with a scheme"),
    ("MLFLOW_TRACKING_URI", "http://user:hunter22@:5000/x?token=abc",
     "'http://user:***@:5000/x?***' names no host"),
])
def test_a_url_without_scheme_or_host_fails_before_any_work(name, url, shown, tmp_path, s3,
                                                            backend):
    result, took = train(job_env(tmp_path, s3, backend, **{name: url}))
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert f"{name}={shown}" in line
    assert "hunter22" not in result.stderr + json.dumps(backend.bodies("status"))
    assert backend.statuses() == ["failed"] and not s3.requests
    assert took < 20


def test_a_scheme_less_callback_url_fails_at_once_without_retrying_it(tmp_path, s3, backend):
    env = job_env(tmp_path, s3, backend)
    env["CALLBACK_URL"] = env["CALLBACK_URL"].split("://", 1)[1]
    result, took = train(env)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert "CALLBACK_URL='127.0.0.1:" in line and "is not a URL with a scheme" in line
    assert not backend.calls and not backend.rejected  # nothing can reach it, nothing retried
    journal = [json.loads(x) for x in (tmp_path / "work" / "callbacks.jsonl").open()]
    assert [e["body"]["status"] for e in journal] == ["failed"]
    assert took < 10, "the exit spent the flush budget retrying an unusable URL"


def test_url_settings_accept_what_they_accept_today(utils_module):
    settings = {s.name: s for s in utils_module.PLATFORM_SETTINGS}
    for uri in ("sqlite:////tmp/mlflow.db", "file:/tmp/mlruns", "file:///tmp/mlruns",
                "http://mlflow:5000", "https://user:pw@mlflow.example.com/path",
                "postgresql+psycopg2://user:pw@db/mlflow", "databricks"):
        assert settings["MLFLOW_TRACKING_URI"].convert(uri) == uri
    for name in ("CALLBACK_URL", "MINIO_ENDPOINT", "R2_ENDPOINT", "S3_ENDPOINT_URL"):
        assert settings[name].convert("https://host.example:8443/a/b") == (
            "https://host.example:8443/a/b")
        with pytest.raises(utils_module.ConfigError, match="not a URL with a scheme"):
            settings[name].convert("ftp://host.example")


# --- an unusable work dir: one line, a `failed` status, no MLflow store --------------------------

def read_only_dir(tmp_path: Path) -> Path:
    """A directory that exists and refuses new files, also to root (which ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")  # sysfs: no file can be created there
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case", ["uncreatable", "read-only"])
def test_an_unusable_work_dir_still_sends_failed(case, tmp_path, s3, backend, sample_zip):
    s3.put_file(f"datasets/{DATASET}.zip", sample_zip)
    s3.requests.clear()
    if case == "uncreatable":
        (tmp_path / "a-file").write_text("not a folder")
        work_dir = tmp_path / "a-file" / "work"
    else:
        work_dir = read_only_dir(tmp_path)
    env = job_env(tmp_path, s3, backend, WORK_DIR=str(work_dir))
    result, took = train(env)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert f"WORK_DIR={work_dir} is unusable" in line
    assert "Traceback" not in result.stderr and "mlflow" not in result.stderr.lower()
    assert backend.statuses() == ["failed"]
    assert "is unusable" in backend.bodies("status")[0]["error"]
    assert not s3.requests, "work started in an unusable work dir"
    assert not list(tmp_path.rglob("mlflow.db")) and not (PYTORCH / "mlruns").exists()
    assert took < 15


def test_a_work_dir_without_room_for_the_journal_is_unusable(tmp_path, utils_module,
                                                             monkeypatch):
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    monkeypatch.setattr(utils_module, "WORK_DIR_MIN_FREE_MB", free_mb + 1024)
    with pytest.raises(utils_module.WorkDirError, match=r"MiB free, under the \d+ MiB"):
        utils_module.check_work_dir(tmp_path / "work")
    monkeypatch.setattr(utils_module, "WORK_DIR_MIN_FREE_MB", 1)
    utils_module.check_work_dir(tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == [], "the probe file was left behind"


# --- one job per work dir ------------------------------------------------------------------------

def test_a_double_launch_is_refused_at_once_and_sends_nothing(tmp_path, s3, backend, sample_zip):
    s3.put_file(f"datasets/{DATASET}.zip", sample_zip)
    env = job_env(tmp_path, s3, backend, EPOCHS="1")
    first = start(env)
    lock = tmp_path / "work" / ".job.lock"
    assert wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), 30)
    launched = time.monotonic()
    second = start(env)
    second_out, second_err = second.communicate(timeout=30)
    refused_in = time.monotonic() - launched
    first_out, first_err = first.communicate(timeout=300)

    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second_err[-3000:]
    [line] = error_lines(second_err)
    assert f"is in use by another process (pid {first.pid})" in line
    assert refused_in < 1.5, f"the second process took {refused_in:.2f} s to be refused"
    # The backend heard one job: keys unique, each naming one event, one terminal status.
    assert backend.statuses() == ["running", "completed"]
    bodies = collections.defaultdict(set)
    for call in backend.calls + backend.duplicates:
        bodies[call.headers["Idempotency-Key"]].add(json.dumps(call.body, sort_keys=True))
    assert all(len(found) == 1 for found in bodies.values()), bodies
    journal = [json.loads(x) for x in (tmp_path / "work" / "callbacks.jsonl").open()]
    assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1))
    assert not (tmp_path / "work" / "failure").exists()


def test_the_lock_dies_with_its_holder(tmp_path, utils_module):
    """SIGKILL never blocks a restart: the kernel drops a dead process's flock."""
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import utils; from pathlib import "
        "Path; utils.lock_work_dir(Path(sys.argv[2])); print('locked', flush=True); "
        "time.sleep(60)"), str(REPO / "template"), str(work)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(utils_module.WorkDirBusy, match=f"pid {holder.pid}"):
        utils_module.lock_work_dir(work)
    holder.kill()
    holder.wait(10)
    os.close(utils_module.lock_work_dir(work))


# --- divergence is a failure ---------------------------------------------------------------------

def test_a_diverging_run_fails_with_its_epoch_and_uploads_last(tmp_path, s3, backend, sample_zip):
    s3.put_file(f"datasets/{DATASET}.zip", sample_zip)
    result, took = train(job_env(tmp_path, s3, backend, LEARNING_RATE="1e30", EPOCHS="3"))
    assert result.returncode == 5, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "training diverged: the training loss is nan at epoch 1" in line
    assert backend.statuses() == ["running", "failed"]
    failed = backend.bodies("status")[-1]
    assert "loss is nan at epoch 1" in failed["error"]
    assert not backend.bodies("training-metrics"), "a NaN epoch was reported as trained"
    assert s3.keys("checkpoints/job-job-1/") == ["checkpoints/job-job-1/last.pt"]
    assert took < 120


@pytest.mark.slow
def test_a_diverging_timm_run_fails_the_same_way(tmp_path, s3, backend):
    timm = REPO / "trainers" / "timm"
    subprocess.run([sys.executable, str(timm / "sample_data.py"), str(tmp_path / "sample"),
                    "--train", "2", "--val", "1", "--test", "1"], check=True,
                   capture_output=True, timeout=120)
    s3.put_file(f"datasets/{DATASET}.zip", tmp_path / "sample" / "datasets" / "sample.zip")
    env = job_env(tmp_path, s3, backend, LEARNING_RATE="1e30", MODEL_NAME="test_resnet",
                  PRETRAINED="false", HF_HUB_OFFLINE="1")
    result, took = train(env, timm)
    assert result.returncode == 5, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert re.search(r"training diverged: the (training|validation) loss is (nan|-?inf) at "
                     r"epoch 1 ", line), line
    assert backend.statuses() == ["running", "failed"]
    assert s3.keys("checkpoints/job-job-1/") == ["checkpoints/job-job-1/last.pt"]
    assert took < 180


def test_timm_and_ultralytics_hand_each_epoch_to_the_check():
    """Both trainers end each epoch through job.end_epoch, which checks first; Ultralytics also
    checks at its train-epoch end, before its own NaN recovery can retry the epoch."""
    template = (REPO / "template" / "utils.py").read_text()
    end_epoch = template.split("    def end_epoch(", 1)[1].split('"""', 2)[2]
    assert end_epoch.lstrip().startswith("self.check_finite(epoch, training, validation")
    assert "job.end_epoch(" in (REPO / "trainers/timm/train.py").read_text()
    reporting = (REPO / "trainers/ultralytics/reporting.py").read_text()
    on_train_end = reporting.split("def on_train_epoch_end", 1)[1].split("def ", 1)[0]
    assert "self.job.check_finite(" in on_train_end
    assert "self.job.end_epoch(" in reporting


def test_ultralytics_reporter_fails_a_nan_epoch(tmp_path, utils_module, monkeypatch):
    """The wiring, with the real reporter and a real Job: a NaN train loss raises at once."""
    monkeypatch.syspath_prepend(str(REPO / "trainers" / "ultralytics"))
    monkeypatch.setitem(sys.modules, "utils", utils_module)
    for name in ("metrics", "reporting", "model"):  # the trainer's own, imported afresh
        monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    import torch

    reporting = importlib.import_module("reporting")
    cfg = utils_module.parse_settings(utils_module.merge_settings(
        utils_module.PLATFORM_SETTINGS, utils_module.TRAIN_SETTINGS), [], {
            "DATASET_ID": "d", "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(tmp_path),
            "WORK_DIR": str(tmp_path / "work")})
    job = utils_module.Job("train", cfg, framework="ultralytics", environ={})
    try:
        trainer = type("Trainer", (), {
            "epoch": 2, "tloss": torch.tensor([float("nan"), 1.0]), "lr": {"lr/pg0": 0.1},
            "epoch_time": 1.0, "train_loader": None,
            "label_loss_items": lambda self, tloss, prefix: {
                f"{prefix}/box_loss": tloss[0], f"{prefix}/cls_loss": tloss[1]}})()
        reporter = reporting.EpochReporter(job, "detect", tmp_path)
        with pytest.raises(utils_module.TrainingDiverged, match="nan at epoch 3"):
            reporter.on_train_epoch_end(trainer)
    finally:
        job.release_work_dir()


# --- a total deadline on every call --------------------------------------------------------------

def test_a_trickling_backend_neither_starves_events_nor_holds_the_exit(tmp_path, s3, backend,
                                                                        sample_zip):
    s3.put_file(f"datasets/{DATASET}.zip", sample_zip)
    backend.set_trickle(1.0)  # 200 at once, then the body at a byte a second (~76 s)
    flush_s = 15.0
    env = job_env(tmp_path, s3, backend, CALLBACK_FLUSH_S=str(flush_s))
    result, took = train(env)
    ended = time.monotonic()
    assert result.returncode == 0, result.stderr[-3000:]
    # Every event reached the backend: none waited behind a trickled answer.
    assert backend.statuses() == ["running", "completed"]
    assert [b["epoch"] for b in backend.bodies("training-metrics")] == [1, 2]
    assert [b["epoch"] for b in backend.bodies("validation-results")] == [1, 2]
    completed = next(c for c in backend.calls if c.body.get("status") == "completed")
    assert ended - completed.time < flush_s + 5, "the exit was held by the trickle"
    assert len([w for w in result.stderr.splitlines() if "trickled its body" in w]) == 1
    assert took < 90


class TricklingProxy:
    """A TCP proxy on loopback that passes requests on at once and answers a byte at a time."""

    def __init__(self, upstream_port: int, seconds_per_byte: float = 0.5) -> None:
        self.upstream, self.delay = (LOOPBACK, upstream_port), seconds_per_byte
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while not self.closed and (data := src.recv(65536)):
                if not delay:
                    dst.sendall(data)
                    continue
                for index in range(len(data)):
                    if self.closed:
                        return
                    dst.sendall(data[index:index + 1])
                    time.sleep(delay)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()

    def close(self) -> None:
        self.closed = True
        self._listener.close()


def test_a_trickling_s3_endpoint_is_bounded(s3, utils_module):
    s3.put_bytes("datasets/x.zip", b"x" * 100)
    proxy = TricklingProxy(s3.port)
    try:
        storage = utils_module.Storage("minio", s3.bucket, endpoint=f"http://{LOOPBACK}:"
                                       f"{proxy.port}", access_key="a-key", secret_key="s-key")
        storage.call_s = 2.0
        started = time.monotonic()
        with pytest.raises(utils_module.StorageError, match="too slow while reading"):
            storage.head("datasets/x.zip")
        assert time.monotonic() - started < 3.0
    finally:
        proxy.close()


def test_a_trickling_mlflow_switches_tracking_off_in_bounded_time(tmp_path, utils_module):
    import mlflow.tracking  # noqa: F401 -- imported before the clock starts

    server = RecordingBackend()
    server.set_trickle(1.0)
    try:
        tracker = utils_module.Tracker(f"http://{LOOPBACK}:{server.port}", "exp", tmp_path,
                                       call_s=1.5)
        started = time.monotonic()
        assert tracker.start("run", {}) is None
        assert time.monotonic() - started < 6.0
        # The health check or the first client call runs out of its total (which one depends
        # on how fast the status line came on a loaded machine): either way, a bounded time.
        reason = tracker.disabled_reason
        assert "no complete answer within 1.5 s" in reason or "unreachable (Timeout)" in reason
        assert [c.path for c in server.calls][:1] == ["/health"]
    finally:
        server.close()
