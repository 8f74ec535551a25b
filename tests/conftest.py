"""Shared fixtures: real servers on loopback, a clean job environment, the module under test."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.contract import contract
from tests.support.servers import (
    BODY_VIOLATIONS,
    REPO,
    TEMPLATE_UTILS,
    MlflowServer,
    RecordingBackend,
    S3Server,
)

# Every variable the platform contract names, plus the families it delegates to (AWS_*, ...):
# a developer's shell or CI runner must not leak any of them into a test job.
PLATFORM_PREFIXES = ("STORAGE_", "MINIO_", "R2_", "AWS_", "MLFLOW_", "S3_", "LOCAL_STORAGE_")
PLATFORM_NAMES = {s.name for table in (contract.PLATFORM_SETTINGS, contract.TRAIN_SETTINGS,
                                        contract.EVALUATE_SETTINGS, contract.PREDICT_SETTINGS,
                                        contract.EXPORT_SETTINGS) for s in table}
# torchrun's variables (utils.OUTSIDE_ENV): a stray RANK in a developer's shell makes rank != 0
PLATFORM_NAMES |= {name for name, why in contract.OUTSIDE_ENV.items() if why.startswith("torchrun")}

NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "mlflow", "alembic", "PIL",
                 "matplotlib", "httpx", "filelock", "git", "trainer")


def is_platform_variable(name: str) -> bool:
    return name in PLATFORM_NAMES or name.startswith(PLATFORM_PREFIXES)


def clean_environ() -> dict[str, str]:
    """A copy of os.environ without any platform variable."""
    return {k: v for k, v in os.environ.items() if not is_platform_variable(k)}


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Whatever a test or the code under test does to os.environ or the root logger is undone.

    utils.Tracker.start() sets MLflow defaults in os.environ and run_job() installs a root log
    handler bound to the current sys.stderr; neither may reach the next test.
    """
    saved_environ = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    os.environ.clear()
    os.environ.update(saved_environ)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    # An outage or auth test that failed half-way may have left the server stopped or strict.
    s3_server.start()
    s3_server.enforce_auth(False)
    s3_server.new_bucket(f"test-{uuid.uuid4().hex[:12]}")
    return s3_server


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend()
    yield server
    server.close()
    assert not server.violations, "bodies not valid in the callback API:\n" + "\n".join(
        server.violations)


EARLY_MLFLOW_SERVER = pytest.StashKey[MlflowServer]()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only for tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Launch the MLflow server now, if any test needs it, so its ~12 s startup overlaps the
    tests that run before the first one that uses it."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in items):
        root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        config.stash[EARLY_MLFLOW_SERVER] = MlflowServer(root, wait=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every body a trainer sent in this session must be valid in the published callback API."""
    if BODY_VIOLATIONS:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "callback bodies not valid in the published callback API "
                               "(schemas/callback-api.openapi.json)", red=True)
            for line in dict.fromkeys(BODY_VIOLATIONS):
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(EARLY_MLFLOW_SERVER, None)
    if server is not None:  # also when the session ended before any test used it
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(pytestconfig: pytest.Config,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = pytestconfig.stash.get(EARLY_MLFLOW_SERVER, None)
    if server is None:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), wait=False)
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def job_env(tmp_path: Path, s3: S3Server, backend: RecordingBackend,
            mlflow_server: MlflowServer) -> dict[str, str]:
    """The environment of a job wired to this test's servers; os.environ itself is untouched."""
    return {
        **clean_environ(),
        **s3.env(),
        **backend.env("job-1"),
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "WORK_DIR": str(tmp_path / "work"),
        "DEVICE": "cpu",
        "NUM_WORKERS": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


RunScript = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def run_script() -> RunScript:
    def run(trainer_dir: Path, script: str, env: dict[str, str], *args: str,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *map(str, args)], cwd=trainer_dir,
                              env=env, capture_output=True, text=True, timeout=timeout)

    return run


def import_by_path(path: Path) -> ModuleType:
    """Import a file under a unique module name (trainers' utils.py copies stay independent)."""
    name = f"utils_under_test_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def utils_module() -> Iterator[ModuleType]:
    """A fresh import of template/utils.py per test: no state carries over between tests."""
    module = import_by_path(TEMPLATE_UTILS)
    yield module
    sys.modules.pop(module.__name__, None)


__all__ = ["REPO"]
