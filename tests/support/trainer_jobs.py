"""What the end-to-end tests of the trainers share: running a trainer's script as the platform
does (under the offline guard), and reading what the recording backend and the bucket got."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.servers import REPO, RecordingBackend, S3Server

GUARD = REPO / "tests" / "support" / "offline_guard"
EXPORT_SCHEMA = REPO / "schemas" / "export-metadata.schema.json"


def guarded(env: dict[str, str], log: Path) -> dict[str, str]:
    """The env, with the offline guard loaded into the subprocess and logging to `log`."""
    return {**env, "PYTHONPATH": str(GUARD), "OFFLINE_GUARD_LOG": str(log)}


def run_script(trainer: Path, script: str, env: dict[str, str], *args: str,
               cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python <trainer>/<script> args` in `cwd` (default: the trainer's folder)."""
    return subprocess.run([sys.executable, str(trainer / script), *args], cwd=cwd or trainer,
                          env=env, capture_output=True, text=True, timeout=timeout)


def of_job(backend: RecordingBackend, route: str, job_id: str) -> list[dict]:
    return [b for b in backend.bodies(route) if b.get("job_id") == job_id]


def statuses(backend: RecordingBackend, job_id: str) -> list[str]:
    return [b["status"] for b in of_job(backend, "status", job_id)]


def bucket_keys(s3: S3Server, bucket: str, prefix: str) -> set[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}
