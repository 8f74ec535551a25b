"""What every benchmark row needs: sizes, result rows, the loopback servers, pinned subprocesses,
and reading a job's callback journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TRAINERS = REPO / "trainers"

# Variables of the platform contract (and the families it delegates to): a developer's shell
# must not leak any of them into a measured job.
PLATFORM_PREFIXES = ("STORAGE_", "MINIO_", "R2_", "AWS_", "MLFLOW_", "S3_", "LOCAL_STORAGE_")
PLATFORM_NAMES = {
    "JOB_ID", "TASK_TYPE", "CALLBACK_URL", "INTERNAL_AUTH_TOKEN", "DATASET_ID",
    "CHECKPOINT_PATH", "INPUT_PATH", "MODEL_NAME", "PRETRAINED", "EPOCHS", "BATCH_SIZE",
    "LEARNING_RATE", "IMAGE_SIZE", "NUM_WORKERS", "SEED", "DEVICE", "CHECKPOINT_EVERY",
    "WORK_DIR", "CACHE_DIR", "DISK_BUDGET_MB", "SHUTDOWN_GRACE_S", "CALLBACK_FLUSH_S",
    "TERMINATION_LOG", "LOG_LEVEL", "EXTRA_ARGS", "PRESET",
}
# Offline and quiet, for ours and the baselines alike.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
         "PYTHONUNBUFFERED": "1"}


class BenchError(Exception):
    """A row could not be measured (a run failed, a trainer is missing, ...)."""


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    repeat: int  # interleaved repetitions of each pair
    startup_repeat: int
    archive_mb: int  # the staged dataset: compressed size and file count
    archive_files: int
    pytorch_images: int  # training images per class (validation: a quarter)
    pytorch_epochs: int
    yolo_images: int
    yolo_epochs: int
    timm_images: int  # per class (the sample has ten)
    timm_epochs: int
    checkpoint_mb: int
    checkpoints: int
    train_s: float  # compute between checkpoints in the stall probe
    warmup: bool = True  # an untimed first run where a cold cache would skew the first pair
    folder_files: int = 100  # images as separate objects in the staged dataset folder
    annotation_images: int = 200  # images (5 boxes each) in the converted annotation file


@dataclasses.dataclass
class Row:
    figure: str
    ours: str = ""
    baseline: str = ""
    shown: str = ""  # the compared figure: a ratio, or a difference
    goal: str = ""
    passed: bool | None = None  # None: not measured
    note: str = ""

    @property
    def result(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]

    @classmethod
    def error(cls, figure: str, reason: str) -> Row:
        return cls(figure, "-", "-", "-", "", None, reason)


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no measurements")
    return statistics.median(values)


def paired_ratio(ours: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of the per-repetition ratios: each pair ran back to back, so drift cancels."""
    return median([o / b for o, b in zip(ours, baseline, strict=True)])


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in PLATFORM_NAMES and not k.startswith(PLATFORM_PREFIXES)}


def split_cores() -> tuple[set[int], set[int]]:
    """(cores for the measured jobs, cores for the stand-in servers)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        return set(cores), set(cores)
    return set(cores[:-1]), {cores[-1]}


def trainer_ready(name: str, module: str) -> bool:
    """The trainer exists and uses its framework (not still the template's tiny CNN)."""
    folder = TRAINERS / name
    pattern = re.compile(rf"^\s*(import|from) {module}\b", re.M)
    return (folder / "train.py").is_file() and any(
        pattern.search(p.read_text(encoding="utf-8")) for p in folder.glob("*.py")
        if p.name != "utils.py")


class Bench:
    """The scratch folder, the servers (started lazily, stopped at exit) and the run helpers."""

    def __init__(self, root: Path, size: Any):
        self.root, self.size = root, size
        self.job_cores, self.server_cores = split_cores()
        self._s3 = None
        self._backend = None
        self._mlflow = None
        self._mlflow_error: BaseException | None = None
        self._mlflow_thread: threading.Thread | None = None
        self._uploaded: dict[str, str] = {}
        self._count = 0

    def __enter__(self) -> Bench:
        sys.path.insert(0, str(REPO))
        if self.server_cores != self.job_cores:
            os.sched_setaffinity(0, self.server_cores)  # servers inherit it; jobs get the rest
        self._mlflow_thread = threading.Thread(target=self._start_mlflow, daemon=True)
        self._mlflow_thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mlflow_thread is not None:
            self._mlflow_thread.join()
        for server in (self._mlflow, self._backend):
            if server is not None:
                with contextlib.suppress(Exception):
                    (server.stop if hasattr(server, "stop") else server.close)()
        if self._s3 is not None:
            with contextlib.suppress(Exception):
                self._s3.stop()

    # -- servers -------------------------------------------------------------------------------
    def _start_mlflow(self) -> None:
        from tests.support.servers import MlflowServer

        try:
            self._mlflow = MlflowServer(self.root / "mlflow-server")
        except BaseException as exc:  # reported by the first row that needs it
            self._mlflow_error = exc

    @property
    def mlflow_uri(self) -> str:
        assert self._mlflow_thread is not None
        self._mlflow_thread.join()
        if self._mlflow is None:
            raise BenchError(f"MLflow server did not start: {self._mlflow_error}")
        return self._mlflow.uri

    @property
    def s3(self):
        if self._s3 is None:
            import logging

            from tests.support.servers import S3Server

            self._s3 = S3Server()
            self._s3.new_bucket("bench")
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
        return self._s3

    @property
    def backend(self):
        if self._backend is None:
            from tests.support.servers import RecordingBackend

            self._backend = RecordingBackend("bench")
        return self._backend

    def new_backend(self):
        from tests.support.servers import RecordingBackend

        return RecordingBackend("bench")

    def upload_once(self, key: str, path: Path) -> str:
        if self._uploaded.get(key) != str(path):
            self.s3.put_file(key, path)
            self._uploaded[key] = str(path)
        return key

    # -- jobs ------------------------------------------------------------------------------------
    def folder(self, label: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:03d}-{label}"
        path.mkdir(parents=True)
        return path

    def base_env(self) -> dict[str, str]:
        """Ours and every baseline: offline, quiet, one OpenMP thread per job core."""
        threads = str(len(self.job_cores) or os.cpu_count() or 1)
        return {**clean_environ(), **QUIET, "OMP_NUM_THREADS": threads}

    def job_env(self, work_dir: Path, backend=None, **settings: str) -> dict[str, str]:
        """A job wired to every server: S3 storage, the backend, the MLflow server.

        The job id is the work folder's name, so each run has its own keys and MLflow run.
        """
        backend = backend or self.backend
        return {**self.base_env(), **self.s3.env(), **backend.env(work_dir.name),
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "WORK_DIR": str(work_dir),
                "DEVICE": "cpu", "NUM_WORKERS": "0", "LOG_LEVEL": "WARNING", **settings}

    def _pin(self) -> None:
        if self.job_cores != self.server_cores:
            os.sched_setaffinity(0, self.job_cores)

    def run(self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
            timeout: float = 1800, what: str = "") -> tuple[float, subprocess.CompletedProcess]:
        """Run a command pinned to the job cores; (wall seconds, result). Fails loudly."""
        started = time.perf_counter()
        try:
            done = subprocess.run(list(map(str, cmd)), env=env, cwd=cwd, capture_output=True,
                                  text=True, timeout=timeout, preexec_fn=self._pin)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what or cmd[0]} ran past {timeout:.0f} s") from None
        except OSError as exc:
            raise BenchError(f"cannot run {cmd[0]}: {exc}") from None
        wall = time.perf_counter() - started
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise BenchError(f"{what or ' '.join(map(str, cmd[:3]))} exited "
                             f"{done.returncode}: {tail[-600:]}")
        return wall, done

    def popen(self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
              log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(list(map(str, cmd)), env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=self._pin)


# -- a job's callback journal (WORK_DIR/callbacks.jsonl) ------------------------------------------

def journal(work_dir: Path) -> list[dict[str, Any]]:
    path = work_dir / "callbacks.jsonl"
    if not path.is_file():
        raise BenchError(f"no callbacks.jsonl in {work_dir}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def event_time(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def epoch_end_times(work_dir: Path) -> list[float]:
    """When each epoch's training metrics were reported (one per epoch, in order)."""
    return [event_time(e) for e in journal(work_dir) if e["route"] == "training-metrics"]


def status_time(work_dir: Path, status: str) -> float:
    for event in journal(work_dir):
        if event["route"] == "status" and event["body"].get("status") == status:
            return event_time(event)
    raise BenchError(f"the job in {work_dir} never reported {status!r}")


def intervals(times: Sequence[float]) -> list[float]:
    """Consecutive differences: the length of every epoch after the first."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def last_json(stdout: str) -> dict[str, Any]:
    """The last line of a probe's stdout that is a JSON object (libraries may print before)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"no JSON result in the output: {stdout[-300:]!r}")


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
