"""Running a trainer the way the platform does: a subprocess configured by env vars only.

A *subject* is one trainer folder under test (every `trainers/*` with a copier answers file, plus
a fresh render of `template/`) with its own bucket on the suite's S3 server. Each scenario
starts a `Run` of its `train.py`, injects faults while it runs, and checks a `RunResult`.

How to run a trainer cheaply is the trainer's own knowledge, declared in its `conformance.toml`
(see README.md in this folder); everything else here is generic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.support.servers import LOOPBACK, MlflowServer, RecordingBackend, S3Server

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template"
TRAINERS_DIR = REPO / "trainers"
ANSWERS_FILE = ".copier-answers.yml"
CONVENTION_FILE = "conformance.toml"
FRESH = "fresh"  # the name of the trainer rendered from template/ for the suite

EPOCHS = 3  # every scenario's run length unless it says otherwise

# Distinctive values: any of them found in anything a job produced is a leak.
MLFLOW_USER = "conformance"
SECRETS = {
    "INTERNAL_AUTH_TOKEN": "cfm-callback-token-7f3a9c1e5b",
    "MINIO_ACCESS_KEY": "cfm-minio-access-4b1d0e",
    "MINIO_SECRET_KEY": "cfm-minio-secret-2d8e4b6a",
    "R2_ACCESS_KEY_ID": "cfm-r2-access-6c2e9f",
    "R2_SECRET_ACCESS_KEY": "cfm-r2-secret-9c4f1a7d",
    "MLFLOW_TRACKING_URI password": "cfm-mlflow-pw-5e2b8d0f",
}


def _template_utils():
    spec = importlib.util.spec_from_file_location("conformance_template_utils",
                                                  TEMPLATE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


# The documented exit codes, from the contract's one source (importing utils does nothing).
_utils = _template_utils()
EXIT_OK, EXIT_CONFIG, EXIT_DATA = _utils.EXIT_OK, _utils.EXIT_CONFIG, _utils.EXIT_DATA
EXIT_CANCELLED, EXIT_SIGTERM = _utils.EXIT_CANCELLED, _utils.EXIT_SIGTERM


class ConformanceFailure(AssertionError):
    """A trainer broke the contract; the message names the scenario and the trainer."""


# ---------------------------------------------------------------------------------------------
# Which trainers, and how each is run cheaply
# ---------------------------------------------------------------------------------------------

def discover_trainers() -> list[str]:
    """Every trainer folder (the rule tools/sync.py uses) and the fresh template render."""
    found = sorted(p.name for p in TRAINERS_DIR.iterdir() if (p / ANSWERS_FILE).is_file()) \
        if TRAINERS_DIR.is_dir() else []
    return [*found, FRESH]


def render_template(dest: Path, slug: str = FRESH) -> Path:
    """`copier copy --defaults` of the working-tree template, as a new framework would start."""
    import copier

    copier.run_copy(str(TEMPLATE), str(dest), data={"slug": slug}, defaults=True, quiet=True,
                    unsafe=False, skip_tasks=True)
    return dest


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """A trainer's `conformance.toml`: how to make a tiny dataset, the cheapest settings."""

    name: str
    path: Path
    dataset_command: tuple[str, ...]
    dataset_id: str
    train_env: Mapping[str, str]

    def write_dataset(self, root: Path) -> Path:
        """Run the trainer's dataset command; return ROOT/datasets/{id}.zip."""
        command = [part.replace("{python}", sys.executable).replace("{root}", str(root))
                   for part in self.dataset_command]
        done = subprocess.run(command, cwd=self.path, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        archive = root / "datasets" / f"{self.dataset_id}.zip"
        if done.returncode != 0 or not archive.is_file():
            raise ConformanceFailure(
                f"trainer '{self.name}': its {CONVENTION_FILE} dataset command {command} did not "
                f"write {archive} (exit {done.returncode}): {done.stderr[-2000:]}")
        return archive


def load_spec(name: str, path: Path) -> TrainerSpec:
    file = path / CONVENTION_FILE
    where = f"trainer '{name}': {file.relative_to(REPO) if file.is_relative_to(REPO) else file}"
    if not file.is_file():
        raise ConformanceFailure(
            f"{where} is missing: every trainer declares how the conformance suite runs it "
            "cheaply (see tests/conformance/README.md; template/conformance.toml is the example)")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConformanceFailure(f"{where} is not valid TOML: {exc}") from None
    problems = []
    unknown = sorted(set(data) - {"dataset", "train"})
    unknown += sorted(f"dataset.{k}" for k in set(data.get("dataset", {})) - {"command", "id"})
    unknown += sorted(f"train.{k}" for k in set(data.get("train", {})) - {"env"})
    if unknown:
        problems.append(f"unknown keys {', '.join(unknown)}")
    dataset = data.get("dataset", {})
    command = dataset.get("command")
    if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
        problems.append("dataset.command must be a non-empty list of strings")
    if not isinstance(dataset.get("id"), str) or not dataset.get("id"):
        problems.append("dataset.id must be a string")
    env = data.get("train", {}).get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        problems.append("train.env must be a table of strings")
    if problems:
        raise ConformanceFailure(f"{where}: {'; '.join(problems)}")
    return TrainerSpec(name, path, tuple(command), dataset["id"], dict(env))


# ---------------------------------------------------------------------------------------------
# Servers the suite needs beyond tests/support/servers.py
# ---------------------------------------------------------------------------------------------

class Backend(RecordingBackend):
    """The recording backend, also noting what arrives while it hangs (it reads, never answers):
    proof that the job *attempted* its terminal status against a hung backend."""

    def __init__(self, job_id: str) -> None:
        self.hung_arrivals: list[tuple[float, dict[str, Any]]] = []
        super().__init__(job_id)

    def _handle(self, request) -> None:  # noqa: ANN001 -- http.server's handler
        if self._hang_released.is_set():
            super()._handle(request)
            return
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        with contextlib.suppress(ValueError):
            self.hung_arrivals.append((time.monotonic(), json.loads(raw)))
        self._hang_released.wait()
        request.close_connection = True


class TcpProxy:
    """A TCP forwarder on loopback. `kill()` resets every open connection and stops listening:
    to a client that is what a killed server looks like (reset, then connection refused), and
    the server behind it stays up for the other scenarios."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = (LOOPBACK, upstream_port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.killed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self.killed:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def kill(self) -> None:
        with self._lock:
            self.killed = True
            self._listener.close()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                    b"\x00\x00\x00\x00")  # close with RST, as a dead process
                    sock.close()


class StrictS3:
    """moto's S3 server in a process of its own, checking credentials (ours are unknown to it,
    so every request is refused with 403). Its own process: moto's auth switch is global to the
    process, and the in-process servers of the other tests must keep accepting any key."""

    def __init__(self, root: Path) -> None:
        import requests

        from tests.support.servers import free_port, wait_until

        port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{port}"
        self._log = open(root / "strict-s3.log", "wb")  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.endpoint}/moto-api/", timeout=1).status_code < 500
            return self._process.poll() is not None

        if not wait_until(up, 60, every=0.1) or self._process.poll() is not None:
            self.stop()
            raise RuntimeError(f"moto server did not start: {(root / 'strict-s3.log').read_text()}")
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data="0", timeout=5
                      ).raise_for_status()

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(5)
        self._log.close()


def mlflow_uri_with_password(port: int) -> str:
    return f"http://{MLFLOW_USER}:{SECRETS['MLFLOW_TRACKING_URI password']}@{LOOPBACK}:{port}"


# ---------------------------------------------------------------------------------------------
# A subject: one trainer, its bucket, its dataset
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Subject:
    spec: TrainerSpec
    s3: S3Server  # the suite's own server: scenarios stop and restart it
    strict_s3: StrictS3  # a second S3 endpoint that refuses every credential
    mlflow: MlflowServer
    bucket: str
    root: Path  # this trainer's scratch folder for runs
    healthy: RunResult | None = None
    reported: bool = True  # False for the suite's own deliberately broken trainer

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def mlflow_port(self) -> int:
        return int(self.mlflow.uri.rsplit(":", 1)[1])

    def run_dir(self, scenario: str) -> Path:
        path = self.root / scenario
        for sub in ("home", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        (path / "termination-log").touch()
        return path

    def env(self, run_dir: Path, job_id: str, backend: RecordingBackend | None,
            **overrides: str | None) -> dict[str, str]:
        """The platform's env for one job (overrides win; a None override unsets)."""
        from tests.conftest import clean_environ

        env = {
            **clean_environ(),
            # Isolation, so "nothing written outside the work dir" can be checked.
            "HOME": str(run_dir / "home"), "TMPDIR": str(run_dir / "tmp"),
            # The image compiles bytecode at build time; here a run must not write into the
            # trainer folder either.
            "PYTHONDONTWRITEBYTECODE": "1",
            "JOB_ID": job_id, "DATASET_ID": self.spec.dataset_id, "EPOCHS": str(EPOCHS),
            "STORAGE_TYPE": "minio", "STORAGE_BUCKET": self.bucket,
            "MINIO_ENDPOINT": self.s3.endpoint,
            "MINIO_ACCESS_KEY": SECRETS["MINIO_ACCESS_KEY"],
            "MINIO_SECRET_KEY": SECRETS["MINIO_SECRET_KEY"],
            # Set in every run, used by some: a secret must not leak even when unused.
            "R2_ACCESS_KEY_ID": SECRETS["R2_ACCESS_KEY_ID"],
            "R2_SECRET_ACCESS_KEY": SECRETS["R2_SECRET_ACCESS_KEY"],
            "MLFLOW_TRACKING_URI": mlflow_uri_with_password(self.mlflow_port),
            "MLFLOW_EXPERIMENT_NAME": f"conformance-{self.name}",
            "WORK_DIR": str(run_dir / "work"),
            "TERMINATION_LOG": str(run_dir / "termination-log"),
            "DEVICE": "cpu",
            # Runs go two at a time on the suite's CPUs (schedule.py): one compute thread each
            # is the fastest split, and keeps each run's timing independent of its neighbour.
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            **self.spec.train_env,
        }
        if backend is not None:
            env.update(backend.env(job_id, SECRETS["INTERNAL_AUTH_TOKEN"]))
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    @contextlib.contextmanager
    def private_endpoint(self) -> Iterator[S3Server]:
        """A second S3 endpoint onto the same buckets (moto keeps its data per process), with
        its own request log, to stop or to watch without touching the other runs."""
        endpoint = S3Server()
        try:
            yield endpoint
        finally:
            endpoint.stop()

    def r2_env(self, endpoint: str) -> dict[str, str]:
        return {"STORAGE_TYPE": "r2", "R2_ENDPOINT": endpoint, "MINIO_ENDPOINT": None,
                "MINIO_ACCESS_KEY": None, "MINIO_SECRET_KEY": None}

    # -- the bucket ----------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        self.s3.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.s3.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        for page in self.s3.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    def etag(self, key: str) -> str | None:
        with contextlib.suppress(Exception):
            return self.s3.client.head_object(Bucket=self.bucket, Key=key)["ETag"].strip('"')
        return None

    def metadata(self, key: str) -> dict[str, str]:
        """An object's user metadata (x-amz-meta-*); {} when there is no such object."""
        with contextlib.suppress(Exception):
            return self.s3.client.head_object(Bucket=self.bucket, Key=key)["Metadata"]
        return {}

    def job_keys(self, job_id: str) -> list[str]:
        return self.keys(f"checkpoints/job-{job_id}/") + self.keys(f"artifacts/job-{job_id}/")

    # -- MLflow --------------------------------------------------------------------------------
    def mlflow_runs(self, job_id: str) -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow.uri)
        experiment = client.get_experiment_by_name(f"conformance-{self.name}")
        if experiment is None:
            return []
        return [run for run in client.search_runs([experiment.experiment_id])
                if run.data.tags.get("job_id") == job_id
                or run.info.run_name in (f"job-{job_id}", f"eval-{job_id}")]


def make_subject(name: str, path: Path, *, s3: S3Server, strict_s3: StrictS3,
                 mlflow: MlflowServer, root: Path, reported: bool = True) -> Subject:
    """Read the trainer's conformance.toml, give it a bucket, write and upload its dataset."""
    import uuid

    from tests.conformance.bad_input import upload_bad_inputs

    spec = load_spec(name, path)
    bucket = f"cfm-{name}-{uuid.uuid4().hex[:8]}"[:63]
    s3.client.create_bucket(Bucket=bucket)
    subject = Subject(spec, s3, strict_s3, mlflow, bucket, root, reported=reported)
    archive = spec.write_dataset(root / "dataset")
    subject.put(f"datasets/{spec.dataset_id}.zip", archive.read_bytes())
    upload_bad_inputs(subject)
    return subject


# ---------------------------------------------------------------------------------------------
# A run of one script, and what it left behind
# ---------------------------------------------------------------------------------------------

def read_journal(work_dir: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(FileNotFoundError):
        for line in (work_dir / "callbacks.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def parse_time(stamp: str) -> float:
    return _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclasses.dataclass
class RunResult:
    trainer: str
    scenario: str
    job_id: str
    run_dir: Path
    env: dict[str, str]
    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    events: list[dict[str, Any]]  # journal lines this run appended
    backend: RecordingBackend | None
    ended: float  # time.monotonic() when the process was seen to exit
    started_wall: float  # time.time() when the process was started (the journal's clock)

    @property
    def work_dir(self) -> Path:
        return Path(self.env["WORK_DIR"])

    def routes(self, route: str) -> list[dict[str, Any]]:
        return [e["body"] for e in self.events if e["route"] == route]

    def statuses(self) -> list[str]:
        return [b.get("status") for b in self.routes("status")]

    def epochs(self) -> list[int]:
        return [b["epoch"] for b in self.routes("training-metrics")]

    def _epoch_times(self) -> list[float]:
        return [parse_time(e["time"]) for e in self.events
                if e["route"] in ("training-metrics", "validation-results")]

    def training_span_s(self) -> float | None:
        """From the first epoch's event to the last epoch's (journal clock): epochs 2..N, the
        steady state of training, without the start-up's imports (seconds of noise)."""
        times = self._epoch_times()
        return times[-1] - times[0] if len(times) >= 2 else None

    def to_last_epoch_s(self) -> float | None:
        """From the process's start to the last epoch's event: start-up included (a job that
        waits on a service before training shows here), exit excluded."""
        times = self._epoch_times()
        return times[-1] - self.started_wall if times else None

    def warnings(self, *words: str) -> list[str]:
        """Warning lines of the log mentioning any of `words` (case-insensitive)."""
        return [line for line in self.stderr.splitlines()
                if ("WARNING" in line or "Warning:" in line)
                and any(w.lower() in line.lower() for w in words)]

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if " ERROR " in line]

    def tail(self, chars: int = 2500) -> str:
        return self.stderr[-chars:]

    def delivery(self) -> dict[str, int]:
        """Events sent (journaled) by this run / stored by the backend / repeats / never stored."""
        sent = {e["seq"] for e in self.events}
        if self.backend is None:
            return {"sent": len(sent), "delivered": 0, "duplicated": 0, "lost": len(sent)}
        stored = {c.envelope.get("seq") for c in self.backend.calls
                  if c.envelope.get("job_id") == self.job_id} & sent
        duplicated = sum(1 for c in self.backend.duplicates if c.envelope.get("seq") in sent
                         and c.envelope.get("job_id") == self.job_id)
        return {"sent": len(sent), "delivered": len(stored), "duplicated": duplicated,
                "lost": len(sent - stored)}


class Run:
    """One script of one trainer as a subprocess, env vars only, stdout/stderr to files."""

    def __init__(self, subject: Subject, scenario: str, env: dict[str, str], *,
                 backend: RecordingBackend | None, script: str = "train.py",
                 label: str | None = None) -> None:
        self.subject, self.scenario, self.env, self.backend = subject, scenario, env, backend
        self.label = label or scenario
        self.work_dir = Path(env["WORK_DIR"])
        self.run_dir = self.work_dir.parent
        self._out = open(self.run_dir / f"{self.label}.stdout", "w+b")  # noqa: SIM115
        self._err = open(self.run_dir / f"{self.label}.stderr", "w+b")  # noqa: SIM115
        self.started = time.monotonic()
        self._started_wall = time.time() - 0.001  # the journal's clock, ms precision
        self.process = subprocess.Popen([sys.executable, script], cwd=subject.spec.path, env=env,
                                        stdout=self._out, stderr=self._err,
                                        start_new_session=True)
        self.ended: float | None = None

    def _fail(self, message: str) -> ConformanceFailure:
        return ConformanceFailure(
            f"conformance scenario '{self.scenario}' failed for trainer '{self.subject.name}': "
            f"{message}\n--- stderr tail ---\n{self._stderr()[-2500:]}")

    def _stderr(self) -> str:
        self._err.flush()
        return (self.run_dir / f"{self.label}.stderr").read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The journal lines this run wrote (not an earlier attempt's, on this work dir or
        restored from storage)."""
        return [e for e in read_journal(self.work_dir)
                if parse_time(e["time"]) >= self._started_wall]

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def wait_for(self, what: str, condition: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 240) -> list[dict[str, Any]]:
        """Poll the job's journal until `condition(events)` holds; fail if the job ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if condition(events):
                return events
            if self.poll() is not None:
                raise self._fail(f"the job exited ({self.process.returncode}) before {what}")
            time.sleep(0.02)
        self.kill()
        raise self._fail(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_for_epoch(self, epoch: int, timeout: float = 240) -> list[dict[str, Any]]:
        return self.wait_for(f"the training-metrics event of epoch {epoch}", lambda events: any(
            e["route"] == "training-metrics" and e["body"].get("epoch", 0) >= epoch
            for e in events), timeout)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the job and anything it started (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.poll()

    def finish(self, timeout: float = 300) -> RunResult:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._close()
            raise self._fail(f"the job did not exit within {timeout:.0f} s") from None
        self.poll()
        return self._close()

    def _close(self) -> RunResult:
        for fh in (self._out, self._err):
            fh.flush()
            fh.close()
        stdout = (self.run_dir / f"{self.label}.stdout").read_text(errors="replace")
        stderr = (self.run_dir / f"{self.label}.stderr").read_text(errors="replace")
        ended = self.ended or time.monotonic()
        events = self.events()
        # Without JOB_ID the job generates its own id (local-...); its journal names it.
        job_id = self.env.get("JOB_ID") or next(
            (e["body"]["job_id"] for e in events if e.get("body", {}).get("job_id")), "local")
        return RunResult(self.subject.name, self.label, job_id, self.run_dir,
                         self.env, self.process.returncode, ended - self.started, stdout, stderr,
                         events, self.backend, ended, self._started_wall)


def run_to_end(subject: Subject, scenario: str, env: dict[str, str], *,
               backend: RecordingBackend | None, timeout: float = 300) -> RunResult:
    return Run(subject, scenario, env, backend=backend).finish(timeout)


# ---------------------------------------------------------------------------------------------
# Evidence: secrets, files outside the work dir, object integrity
# ---------------------------------------------------------------------------------------------

def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def tree_state(root: Path, skip: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file, for "nothing was written here"."""
    skipped = tuple(skip)
    state = {}
    for path in files_under(root):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(skipped):
            st = path.stat()
            state[rel] = (st.st_size, st.st_mtime_ns)
    return state


def find_secrets(blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """'where: which secret' for every secret value found in the named blobs."""
    hits = []
    for where, data in blobs:
        for name, value in SECRETS.items():
            if value.encode() in data:
                hits.append(f"{where}: {name}")
    return hits


def produced_blobs(subject: Subject, result: RunResult) -> Iterable[tuple[str, bytes]]:
    """Every byte a job produced: its output streams, every file in its work dir, the backend's
    recorded bodies, its MLflow params / tags / artifacts and its objects in the bucket."""
    yield "stdout", result.stdout.encode()
    yield "stderr", result.stderr.encode()
    yield "termination-log", (result.run_dir / "termination-log").read_bytes()
    for path in files_under(result.work_dir):
        with contextlib.suppress(OSError):
            yield f"work dir {path.relative_to(result.work_dir)}", path.read_bytes()
    if result.backend is not None:
        calls = [*result.backend.calls, *result.backend.duplicates, *result.backend.rejected]
        yield "backend bodies", json.dumps([[c.path, c.body] for c in calls]).encode()
        yield "backend hung arrivals", json.dumps(
            [b for _, b in getattr(result.backend, "hung_arrivals", [])]).encode()
    for run in subject.mlflow_runs(result.job_id):
        yield f"MLflow run {run.info.run_id} params/tags", json.dumps(
            [run.data.params, run.data.tags]).encode()
        yield from _mlflow_artifacts(subject, run.info.run_id)
    for key in subject.job_keys(result.job_id):
        yield f"bucket {key}", subject.get(key)


def _mlflow_artifacts(subject: Subject, run_id: str) -> Iterable[tuple[str, bytes]]:
    import tempfile

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # (tests restore os.environ)
    client = MlflowClient(subject.mlflow.uri)
    if not client.list_artifacts(run_id):
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "", tmp))
        for path in files_under(local):
            yield f"MLflow artifact {path.relative_to(local)}", path.read_bytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
