# Vendored platform contract. Source of truth: template/utils.py in the trainers monorepo.
# Copies under trainers/*/utils.py are generated: never edit them by hand. Edit template/utils.py,
# then run `python tools/sync.py` (CI runs `python tools/sync.py --check` and fails on drift).
"""The platform contract every trainer script needs, in one file.

Sections, top to bottom:

1. Errors and exit codes   -- the small exception tree `main` maps to an exit code.
2. Configuration           -- every setting declared once; env parsing, CLI flags, --help, docs;
                              the variables read outside the settings table (OUTSIDE_ENV).
3. Capabilities manifest   -- what a trainer can do (capabilities.json) and the platform's
                              pre-launch job validator, `validate_job_settings` (platform-side
                              code, vendored on purpose: see the section's header); the typed
                              framework options (EXTRA_ARGS) and presets (PRESET).
4. Storage                 -- MinIO / R2 / S3 / local: one bucket's objects.
5. Dataset staging         -- archive checks, ranged parallel download + extraction, folder
                              datasets, the version-keyed cache, prediction inputs; the image
                              safety policy; the platform's annotation format; which checkpoints
                              may run code when loaded; files written atomically.
6. Background delivery     -- ordered worker threads with total deadlines: callbacks, uploads,
                              MLflow.
7. Callbacks               -- status / training-metrics / validation-results to the backend;
                              the job's log lines (POST /logs) and per-image validation results.
8. MLflow                  -- one run per job, best-effort, never stalls training; a null
                              tracker when tracking is off.
9. Job lifecycle           -- `run_job`: settings -> running -> work -> completed | failed.
10. Results                -- the platform's classification metrics and the export envelope
                              (metadata.json, archive, upload) every trainer shares.
11. The seed's names       -- `download_dataset`, `notify_status`, `log_metrics`, ... bound to
                              the running job.

Importing this module does nothing: no env reads, no clients, no threads. Heavy libraries
(boto3, requests, mlflow, tqdm) are imported where first needed so `train.py --help` is instant.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# The contract's logger. A trainer module's logger is its child, so the job's handlers, level and
# secret redaction apply to it too: `log = logging.getLogger(f"trainer.{__name__}")`.
log = logging.getLogger("trainer")

CONTRACT_VERSION = "1"

# =============================================================================================
# 1. Errors and exit codes
# =============================================================================================

EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug: the traceback is logged
EXIT_CONFIG = 2  # missing or ill-typed settings
EXIT_DATA = 3  # dataset, checkpoint or storage problem
EXIT_CANCELLED = 4  # the platform asked the job to stop ({"cancel": true})
EXIT_DIVERGED = 5  # the training or validation loss stopped being finite
EXIT_SIGTERM = 143  # SIGTERM (128 + 15), as Kubernetes expects

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug; traceback in the log)",
    EXIT_CONFIG: "configuration error: a setting is missing or invalid",
    EXIT_DATA: "data or storage error: dataset, checkpoint, bucket or endpoint",
    EXIT_CANCELLED: "cancelled by the platform (a callback answered {\"cancel\": true})",
    EXIT_DIVERGED: "training diverged: the loss stopped being finite (last.pt is uploaded)",
    EXIT_SIGTERM: "cancelled by SIGTERM",
}


class TrainerError(Exception):
    """An expected failure of the job: reported as one line, no traceback."""

    exit_code = EXIT_UNEXPECTED
    status = "failed"


class ConfigError(TrainerError):
    exit_code = EXIT_CONFIG


class StorageError(TrainerError):
    exit_code = EXIT_DATA


class DatasetError(TrainerError):
    exit_code = EXIT_DATA


class CheckpointError(TrainerError):
    exit_code = EXIT_DATA


class WorkDirError(ConfigError):
    """WORK_DIR cannot be created or written, or has no room for the journal."""


class WorkDirBusy(ConfigError):
    """Another process holds this work dir: nothing may be sent under the job's keys."""


class TrainingDiverged(TrainerError):
    exit_code = EXIT_DIVERGED


class JobCancelled(TrainerError):
    status = "cancelled"

    def __init__(self, reason: str, exit_code: int = EXIT_CANCELLED):
        super().__init__(reason)
        self.exit_code = exit_code


# =============================================================================================
# 2. Configuration
# =============================================================================================

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_KINDS = ("str", "int", "float", "bool", "json")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the contract: an env var (for the platform) and a CLI flag (for people)."""

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    secret: bool = False
    required: bool = False
    required_if: tuple[str, str] | None = None  # (OTHER, value) or (OTHER, "*") for "when set"
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    group: str = "basic"  # "basic" or "advanced": how a UI groups it
    identifier: bool = False  # becomes part of a path or storage key: IDENTIFIER's rule
    url_schemes: tuple[str, ...] = ()  # a URL setting: the schemes it accepts (see check_url)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"{self.name}: kind must be one of {_KINDS}")

    @property
    def attr(self) -> str:
        return self.name.lower()

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    def shown(self, value: Any) -> str:
        return "<redacted>" if self.secret else repr(value)

    def convert(self, raw: str) -> Any:
        """Parse a raw string; raise ConfigError naming the variable and the bad value."""
        text = raw.strip()
        shown = "<redacted>" if self.secret else repr(raw)
        value: Any
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(f"{self.name}={shown} is not an integer") from None
        elif self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{self.name}={shown} is not a number") from None
            if not math.isfinite(value):  # nan passes every comparison below; inf trains NaNs
                raise ConfigError(f"{self.name}={shown} is not a finite number")
        elif self.kind == "bool":
            if text.lower() in _TRUE:
                value = True
            elif text.lower() in _FALSE:
                value = False
            else:
                raise ConfigError(f"{self.name}={shown} is not a boolean (true/false/1/0/yes/no)")
        elif self.kind == "json":
            try:
                value = json.loads(text) if text else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{self.name}={shown} is not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{self.name}={shown} must be a JSON object")
        else:
            value = text
            if self.identifier:
                check_identifier(self.name, value)
            if self.url_schemes:
                check_url(self.name, value, self.url_schemes, secret=self.secret)
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.name}={shown} is not one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{self.name}={shown} is below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.name}={shown} is above the maximum {self.maximum:g}")
        return value


# One rule for every identifier that becomes part of a path or a storage key (JOB_ID,
# DATASET_ID, ...): no `/`, no `..`, no leading `.` or `-`, bounded length.
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_identifier(name: str, value: str) -> str:
    """`value` if it is a valid identifier, else a ConfigError naming the setting."""
    if not IDENTIFIER.fullmatch(value):
        raise ConfigError(f"{name}={value!r} is not a valid identifier (1-128 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit: it names paths and "
                          "storage keys)")
    return value


HTTP_SCHEMES = ("http", "https")
# What MLflow's tracking URI may be: a server, or a store it opens itself (sqlite:///PATH, a
# database URL such as postgresql+psycopg2://..., file:PATH).
MLFLOW_SCHEMES = (*HTTP_SCHEMES, "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def check_url(name: str, url: str, schemes: Sequence[str], *, secret: bool = False) -> None:
    """A URL setting must name one of `schemes` and, for http(s), a host: a URL without them
    fails every call (requests' InvalidSchema), retried for the whole job. ConfigError if not.
    A secret URL is shown with its password and query hidden, as in the logs."""
    shown = (repr(redact_url(url)) if "://" in url else "<redacted>") if secret else repr(url)
    if url in schemes and url not in HTTP_SCHEMES:  # e.g. MLflow's "databricks": a profile
        return
    parts = urlsplit(url)
    scheme = parts.scheme.lower().split("+")[0]  # postgresql+psycopg2 is postgresql
    if not parts.scheme or scheme not in schemes or (scheme in HTTP_SCHEMES and "://" not in url):
        wanted = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{name}={shown} is not a URL with a scheme ({wanted})")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError:
        raise ConfigError(f"{name}={shown} has an invalid host or port") from None
    if scheme in HTTP_SCHEMES and not host:
        raise ConfigError(f"{name}={shown} names no host")


STORAGE_TYPES = ("minio", "r2", "s3", "local")
TASK_TYPES = (
    "image_classification",
    "object_detection",
    "instance_segmentation",
    "semantic_segmentation",
    "pose_estimation",
)

# Settings every script reads (section 1 of the platform contract).
PLATFORM_SETTINGS: tuple[Setting, ...] = (
    Setting("JOB_ID", help="The job's id; names its storage keys and MLflow run.",
            required_if=("CALLBACK_URL", "*"), identifier=True),
    Setting("TASK_TYPE", help="Task kind as the callbacks name it; default: from the "
            "model/dataset.", choices=TASK_TYPES, group="advanced"),
    Setting("CALLBACK_URL", help="Base URL of this job's callback endpoints; unset: no callbacks.",
            url_schemes=HTTP_SCHEMES, group="advanced"),
    Setting("INTERNAL_AUTH_TOKEN", help="Sent as X-Internal-Auth on every callback.", secret=True,
            required_if=("CALLBACK_URL", "*"), group="advanced"),
    Setting("DEVICE", default="auto", help="auto, cpu, cuda, 0, 0,1, ..."),
    Setting("STORAGE_TYPE", default="minio", help="Object storage backend.", choices=STORAGE_TYPES,
            group="advanced"),
    Setting("STORAGE_BUCKET", default="vision-platform", help="Bucket holding datasets, "
            "checkpoints and artifacts.", group="advanced"),
    Setting("MINIO_ENDPOINT", help="MinIO endpoint URL.", required_if=("STORAGE_TYPE", "minio"),
            url_schemes=HTTP_SCHEMES, group="advanced"),
    Setting("MINIO_ACCESS_KEY", help="MinIO access key.", secret=True,
            required_if=("STORAGE_TYPE", "minio"), group="advanced"),
    Setting("MINIO_SECRET_KEY", help="MinIO secret key.", secret=True,
            required_if=("STORAGE_TYPE", "minio"), group="advanced"),
    Setting("R2_ENDPOINT", help="Cloudflare R2 endpoint URL.", required_if=("STORAGE_TYPE", "r2"),
            url_schemes=HTTP_SCHEMES, group="advanced"),
    Setting("R2_ACCESS_KEY_ID", help="R2 access key id.", secret=True,
            required_if=("STORAGE_TYPE", "r2"), group="advanced"),
    Setting("R2_SECRET_ACCESS_KEY", help="R2 secret access key.", secret=True,
            required_if=("STORAGE_TYPE", "r2"), group="advanced"),
    Setting("S3_ENDPOINT_URL", help="Endpoint for STORAGE_TYPE=s3 (credentials: the AWS_* chain).",
            url_schemes=HTTP_SCHEMES, group="advanced"),
    Setting("LOCAL_STORAGE_ROOT", help="Folder that plays the bucket for STORAGE_TYPE=local.",
            required_if=("STORAGE_TYPE", "local"), group="advanced"),
    Setting("MLFLOW_TRACKING_URI", help="MLflow tracking URI; unset: a local store in WORK_DIR.",
            secret=True, url_schemes=MLFLOW_SCHEMES, group="advanced"),
    Setting("MLFLOW_EXPERIMENT_NAME", default="vision-platform", help="MLflow experiment; "
            "{JOB_ID} in it is replaced by the job's id (job_{JOB_ID}: one per job).",
            group="advanced"),
    Setting("WORK_DIR", help="Local scratch and outputs; default: "
            "<tmp>/vision-platform/job-<JOB_ID>.", group="advanced"),
    Setting("CACHE_DIR", help="Dataset cache (keyed by ETag); default: WORK_DIR/cache.",
            group="advanced"),
    Setting("DISK_BUDGET_MB", "int", help="Most disk the dataset may take; default: the free "
            "space.", minimum=0, group="advanced"),
    Setting("SHUTDOWN_GRACE_S", "float", 30.0, "Seconds between SIGTERM and exit.", minimum=1,
            group="advanced"),
    Setting("CALLBACK_FLUSH_S", "float", 15.0, "Most seconds spent at exit delivering callbacks.",
            minimum=0, group="advanced"),
    Setting("TERMINATION_LOG", default="/dev/termination-log", help="Failure reason for Kubernetes "
            "(written only when the file exists and is writable).", group="advanced"),
    Setting("LOG_LEVEL", default="INFO", help="Logging level.",
            choices=("DEBUG", "INFO", "WARNING", "ERROR"), group="advanced"),
    Setting("TRUSTED_CHECKPOINT_PREFIXES", help="Comma-separated storage prefixes (key prefixes "
            "in STORAGE_BUCKET, or s3://bucket/prefix) whose checkpoints may run code when "
            "loaded, besides checkpoints/ of STORAGE_BUCKET (written by this platform's jobs).",
            group="advanced"),
    Setting("CA_BUNDLE", help="PEM file of the CA(s) that sign the callback, storage and MLflow "
            "endpoints' certificates (a private CA); default: the system's, or "
            "REQUESTS_CA_BUNDLE / AWS_CA_BUNDLE.", group="advanced"),
    Setting("IMAGE_REF", help="The image the job runs in (registry/name@sha256:...), recorded as "
            "provenance on the MLflow run and the checkpoints.", group="advanced"),
)

# Hyperparameters every trainer's train.py reads; a trainer changes defaults with `with_defaults`.
TRAIN_SETTINGS: tuple[Setting, ...] = (
    Setting("DATASET_ID", help="Dataset datasets/{DATASET_ID}.zip, else the folder "
            "datasets/{DATASET_ID}/.", required=True,
            identifier=True),
    Setting("CHECKPOINT_PATH", help="Resume from an interrupted job's last.pt, or fine-tune from a "
            "finished model (storage key or s3://bucket/key)."),
    Setting("MODEL_NAME", help="Framework model name."),
    Setting("PRETRAINED", "bool", True, "Start from pretrained weights (needs network access)."),
    Setting("EPOCHS", "int", 10, "Number of training epochs.", minimum=1),
    Setting("BATCH_SIZE", "int", 16, "Images per batch (per process).", minimum=1),
    Setting("LEARNING_RATE", "float", 0.001, "Initial learning rate.", minimum=0),
    Setting("IMAGE_SIZE", "int", 224, "Input image size in pixels.", minimum=8),
    Setting("NUM_WORKERS", "int", 2, "Data-loader worker processes.", minimum=0, group="advanced"),
    Setting("SEED", "int", 0, "Random seed.", group="advanced"),
    Setting("CHECKPOINT_EVERY", "int", 1, "Upload an epoch checkpoint every N epochs.", minimum=1,
            group="advanced"),
    Setting("KEEP_EPOCH_CHECKPOINTS", "int", None, "Keep the newest N epoch-N.pt in the bucket, "
            "deleting older ones (0: upload none); default: keep all. best.pt and last.pt stay.",
            minimum=0, group="advanced"),
    Setting("PRESET", help="Named bundle of framework options; EXTRA_ARGS overrides single "
            "values.", group="advanced"),
    Setting("EXTRA_ARGS", "json", None, "Framework options as a JSON object, over PRESET's; each "
            "one typed and ranged in the trainer's capabilities.", group="advanced"),
    Setting("MAX_BAD_IMAGES", "int", 0, "Unreadable, truncated or oversized images skipped (with "
            "one warning listing them) before the dataset check fails.", minimum=0,
            group="advanced"),
    Setting("VAL_IMAGE_RESULTS_MAX", "int", 200, "Most per-image results of the last validation "
            "sent to the platform's UI (mistakes first); 0: none.", minimum=0, group="advanced"),
    Setting("VAL_FRACTION", "float", 0.2, "Platform annotations without a split: the share of "
            "images drawn for val.", minimum=0, maximum=0.9, group="advanced"),
    Setting("SPLIT_SEED", "int", 42, "Platform annotations without a split: the seed of the "
            "split, the same on every run.", group="advanced"),
)

EVALUATE_SETTINGS: tuple[Setting, ...] = (
    Setting("CHECKPOINT_PATH", help="The checkpoint to evaluate.", required=True),
    Setting("DATASET_ID", help="Dataset datasets/{DATASET_ID}.zip, else the folder "
            "datasets/{DATASET_ID}/.", required=True,
            identifier=True),
    Setting("SPLIT", default="val", help="Dataset split to evaluate.", choices=("val", "test")),
    Setting("BATCH_SIZE", "int", 16, "Images per batch.", minimum=1),
    Setting("IMAGE_SIZE", "int", None, "Input size; default: the checkpoint's.", minimum=8),
    Setting("NUM_WORKERS", "int", 2, "Data-loader worker processes.", minimum=0, group="advanced"),
    Setting("MAX_BAD_IMAGES", "int", 0, "Unreadable, truncated or oversized images skipped (with "
            "one warning listing them) before the dataset check fails.", minimum=0,
            group="advanced"),
    Setting("VAL_IMAGE_RESULTS_MAX", "int", 200, "Most per-image results of the last validation "
            "sent to the platform's UI (mistakes first); 0: none.", minimum=0, group="advanced"),
    Setting("VAL_FRACTION", "float", 0.2, "Platform annotations without a split: the share of "
            "images drawn for val.", minimum=0, maximum=0.9, group="advanced"),
    Setting("SPLIT_SEED", "int", 42, "Platform annotations without a split: the seed of the "
            "split, the same on every run.", group="advanced"),
)

PREDICT_SETTINGS: tuple[Setting, ...] = (
    Setting("CHECKPOINT_PATH", help="The checkpoint to predict with.", required=True),
    Setting("INPUT_PATH", help="Storage key of an image, a .zip of images, or a prefix ending "
            "in /; or a local file/folder.", required=True),
    Setting("CONF_THRESHOLD", "float", 0.25, "Minimum confidence kept.", minimum=0, maximum=1),
    Setting("IOU_THRESHOLD", "float", 0.7, "IoU threshold for non-maximum suppression.", minimum=0,
            maximum=1),
    Setting("TOP_K", "int", 5, "Classes kept per image (classification).", minimum=1),
    Setting("IMAGE_SIZE", "int", None, "Input size; default: the checkpoint's.", minimum=8),
    Setting("BATCH_SIZE", "int", 16, "Images per batch.", minimum=1),
)

# A trainer with more formats than these two replaces EXPORT_FORMAT's choices in its export.py.
EXPORT_SETTINGS: tuple[Setting, ...] = (
    Setting("CHECKPOINT_PATH", help="The checkpoint to export.", required=True),
    Setting("EXPORT_FORMAT", help="Format of the exported model.", required=True,
            choices=("onnx", "torchscript")),
    Setting("IMAGE_SIZE", "int", None, "Input size; default: the checkpoint's.", minimum=8),
    Setting("DYNAMIC_BATCH", "bool", False, "Accept any batch size (default: a fixed batch of 1).",
            group="advanced"),
    Setting("HALF", "bool", False, "Export in float16 (needs a CUDA device).", group="advanced"),
    Setting("OPSET", "int", 17, "ONNX opset version (onnx only).", minimum=7, maximum=20,
            group="advanced"),
)


# Variables a job reads that are not settings: a launcher or a library owns them, so they have no
# flag, no default of ours and no place in --help or the manifest. Read them through
# `outside_env` (a name missing here is a bug), and only at the edge, like settings.
OUTSIDE_ENV: dict[str, str] = {
    "RANK": "torchrun: this process's global rank; only rank 0 reports, uploads and tracks.",
    "LOCAL_RANK": "torchrun: the rank on this node; picks the GPU (and tells Ultralytics' "
                  "train.py that torchrun, not the platform, launched it).",
    "WORLD_SIZE": "torchrun: how many processes train together.",
    "LOCAL_WORLD_SIZE": "torchrun: processes on this node; each gets its share of the CPU "
                        "threads and data-loader workers.",
    "TORCHELASTIC_RUN_ID": "torchrun: this launch's id; names the markers ranks share, so one "
                           "left by an earlier launch is never taken for this one's.",
    "HF_HOME": "Hugging Face Hub: its cache folder, where pretrained timm weights are looked up.",
    "HF_HUB_OFFLINE": "Hugging Face Hub: set by a person to forbid downloads; the timm trainer "
                      "sets it itself when the hub is unreachable or weights are not needed.",
    "HF_ENDPOINT": "Hugging Face Hub: a mirror to download pretrained weights from.",
    "YOLO_CONFIG_DIR": "Ultralytics: its settings folder, which the Ultralytics trainer points "
                       "at the job's work dir before importing it (read back to catch an "
                       "import that came first).",
    "TRAINER_REVISION": "The image's build: the git commit the trainer was built from (the "
                        "images workflow's REVISION build arg), recorded as provenance.",
}


def outside_env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of a variable declared in OUTSIDE_ENV (None when unset or empty)."""
    if name not in OUTSIDE_ENV:
        raise KeyError(f"{name} is not declared in OUTSIDE_ENV")
    value = (os.environ if environ is None else environ).get(name)
    return value if value not in (None, "") else None


def with_defaults(settings: Sequence[Setting], **defaults: Any) -> tuple[Setting, ...]:
    """The same settings with some defaults changed: with_defaults(TRAIN_SETTINGS, EPOCHS=3)."""
    names = {s.name for s in settings}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ValueError(f"no such settings: {', '.join(unknown)}")
    return tuple(dataclasses.replace(s, default=defaults[s.name]) if s.name in defaults else s
                 for s in settings)


def merge_settings(*groups: Sequence[Setting]) -> tuple[Setting, ...]:
    """Concatenate groups of settings; a later group's setting replaces an earlier one's."""
    merged: dict[str, Setting] = {}
    for group in groups:
        for setting in group:
            merged[setting.name] = setting
    return tuple(merged.values())


class Config:
    """Base of the frozen, typed settings object `parse_settings` returns (attrs: lower-case)."""

    _settings: Mapping[str, Setting] = {}
    _given: frozenset[str] = frozenset()  # names set by a flag or a variable, not defaulted

    def get(self, name: str) -> Any:
        return getattr(self, name.lower())

    def given(self, name: str) -> bool:
        """Whether NAME was set explicitly (flag or variable), rather than left to its default."""
        return name in self._given

    def redacted(self) -> dict[str, Any]:
        """Every setting by env name, secrets replaced: safe to log and to send to MLflow."""
        out = {}
        for name, setting in self._settings.items():
            value = self.get(name)
            out[name] = "<redacted>" if setting.secret and value not in (None, "") else value
        return out

    def secret_values(self) -> list[str]:
        values = [str(self.get(n)) for n, s in self._settings.items() if s.secret and self.get(n)]
        # A URL's password can appear on its own (e.g. in an exception message).
        for value in list(values):
            password = urlsplit(value).password if "://" in value else None
            if password:
                values.append(password)
        return [v for v in values if len(v) >= 4]


class _ArgumentParser(argparse.ArgumentParser):
    """A bad flag is a configuration error like a bad variable: reported as `failed`, not a bare
    SystemExit that skips the failure record (`--help` still exits 0)."""

    def error(self, message: str) -> Any:
        raise ConfigError(f"command line: {message}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps at the terminal's width between words, never inside one (`image_classification`
    stays whole); a paragraph indented in the source (an example, a list) keeps its lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False,
                             break_on_hyphens=False) or [""]

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(
                    " ".join(paragraph.split()), width, initial_indent=indent,
                    subsequent_indent=indent, break_long_words=False, break_on_hyphens=False))
        return "\n\n".join(paragraphs)


# --help's sections, in order: the script's own job first, then where things go, then the rest.
HELP_SECTIONS = {
    "job": "job: dataset, model and hyperparameters",
    "storage": "storage: where datasets, checkpoints and artifacts live",
    "callbacks": "callbacks: reporting to the platform's backend",
    "mlflow": "MLflow tracking",
    "advanced": "advanced",
}
_SECTION_NAMES = {
    "storage": ("STORAGE_TYPE", "STORAGE_BUCKET", "MINIO_", "R2_", "S3_ENDPOINT_URL",
                "LOCAL_STORAGE_ROOT"),
    "callbacks": ("CALLBACK_URL", "INTERNAL_AUTH_TOKEN", "CALLBACK_FLUSH_S"),
    "mlflow": ("MLFLOW_",),
}
# What `--help`'s example passes for a required setting (others: their first choice or <NAME>).
_EXAMPLE_VALUES = {"DATASET_ID": "sample", "CHECKPOINT_PATH": "checkpoints/job-<JOB_ID>/best.pt",
                   "INPUT_PATH": "<an image or a folder of images>"}


def help_section(setting: Setting) -> str:
    """The --help section a setting is listed in (one of HELP_SECTIONS)."""
    for section, names in _SECTION_NAMES.items():
        if setting.name.startswith(names):
            return section
    return "advanced" if setting.group == "advanced" else "job"


def help_example(settings: Sequence[Setting], prog: str | None) -> str:
    """One command that runs the script on the bundled sample, for the end of --help."""
    words = ["STORAGE_TYPE=local", "LOCAL_STORAGE_ROOT=.sample", "python", prog or "train.py"]
    for s in settings:
        if s.required:
            value = _EXAMPLE_VALUES.get(s.name) or (s.choices[0] if s.choices else f"<{s.name}>")
            words += [s.flag, f"'{value}'" if " " in value else value]
    by_name = {s.name: s for s in settings}
    if "PRETRAINED" in by_name and by_name["PRETRAINED"].default:
        words += ["--pretrained", "false"]  # offline: pretrained weights need a download
    if "EPOCHS" in by_name:
        words += ["--epochs", "3"]
    return " ".join(words)


def build_parser(settings: Sequence[Setting], prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter,
        allow_abbrev=False,  # `--epoch 3` must not silently mean `--epochs 3`
        add_help=False,  # -h goes last, with --capabilities, after the settings
        epilog="Every flag has an environment variable of the same name in capitals "
               "(shown in brackets); a flag wins over its variable.\n"
               + _secrets_epilog(settings) + "\n"
               "Exit codes: " + "; ".join(f"{c} {m}" for c, m in EXIT_CODES.items()) + ".\n\n"
               "Example (after `python sample_data.py .sample`):\n\n"
               "  " + help_example(settings, prog).replace("%", "%%"))
    sections = {name: parser.add_argument_group(title) for name, title in HELP_SECTIONS.items()}
    platform = {s.name for s in PLATFORM_SETTINGS}
    # The script's own settings lead its section; the platform's (JOB_ID, DEVICE) follow them.
    for s in sorted(settings, key=lambda s: s.name in platform):
        if s.secret:
            continue  # never a flag: argv is visible to every process on the node
        default = "<redacted>" if s.secret and s.default else s.default
        bits = [f"env {s.name}", s.kind]
        if s.choices:
            bits.append("one of " + ", ".join(s.choices))
        if s.required:
            bits.append("required")
        elif default is not None:
            bits.append(f"default {default}")
        sections[help_section(s)].add_argument(
            s.flag, dest=s.attr, metavar=s.kind.upper(), default=None,
            help=f"{s.help} [{'; '.join(bits)}]".replace("%", "%%"))
    other = parser.add_argument_group("other")
    other.add_argument("-h", "--help", action="help", help="show this help and exit")
    other.add_argument("--capabilities", action="store_true",
                       help="print this trainer's capabilities manifest (JSON) and exit; "
                            "reads no settings and does no work")
    return parser


def parse_settings(settings: Sequence[Setting], argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None, *, prog: str | None = None,
                   description: str | None = None) -> Config:
    """Resolve every setting once (flag > env > default) into a frozen, typed Config.

    Every problem is collected and raised at once as one ConfigError.
    """
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_secret_flags(settings, argv)
    args = build_parser(settings, prog, description).parse_args(argv)
    values: dict[str, Any] = {}
    problems: list[str] = []
    missing: list[str] = []
    invalid: set[str] = set()
    given: set[str] = set()
    for s in settings:
        raw = getattr(args, s.attr, None)
        if raw is None:
            raw = environ.get(s.name)
        if s.secret:
            try:
                raw = secret_from_env(s.name, environ)
            except ConfigError as exc:
                problems.append(str(exc))
                values[s.attr] = s.default
                invalid.add(s.name)
                continue
        if raw is None or raw.strip() == "":
            values[s.attr] = s.default
            continue
        given.add(s.name)
        try:
            values[s.attr] = s.convert(raw)
        except ConfigError as exc:
            problems.append(str(exc))
            values[s.attr] = s.default
            invalid.add(s.name)  # reported as invalid, not also as missing
    for s in settings:
        if values[s.attr] not in (None, "") or s.name in invalid:
            continue
        if s.required:
            missing.append(s.name)
        elif s.required_if:
            other, wanted = s.required_if
            other_value = values.get(other.lower())
            if other_value not in (None, "") and wanted in ("*", other_value):
                missing.append(s.name)
    if missing:
        problems.insert(0, "missing required settings: " + ", ".join(missing))
    if problems:
        raise ConfigError("; ".join(problems))
    cls = dataclasses.make_dataclass(
        "Config", [(s.attr, Any) for s in settings], bases=(Config,), frozen=True)
    cls._settings = {s.name: s for s in settings}
    cls._given = frozenset(given)
    return cls(**values)


def _secrets_epilog(settings: Sequence[Setting]) -> str:
    names = [s.name for s in settings if s.secret]
    if not names:
        return ""
    return ("Secrets are not accepted as flags (argv is visible to every process on the node): "
            f"set {', '.join(names)} in the environment, or NAME_FILE to a file holding the "
            "value.\n")


def refuse_secret_flags(settings: Sequence[Setting], argv: Sequence[str]) -> None:
    """A secret passed as a flag is a configuration error naming the variable to use instead."""
    given = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
    refused = [s for s in settings if s.secret and s.flag in given]
    if refused:
        raise ConfigError("; ".join(
            f"{s.flag} is not accepted on the command line (argv is visible to every process on "
            f"the node): set {s.name} or {s.name}_FILE instead" for s in refused))


def secret_from_env(name: str, environ: Mapping[str, str]) -> str | None:
    """A secret's value from NAME, or from the file NAME_FILE names (the convention of official
    container images; Kubernetes mounts secrets as files). One trailing newline is dropped."""
    value, file = environ.get(name), environ.get(f"{name}_FILE")
    if not (file or "").strip():
        return value
    if (value or "").strip():
        raise ConfigError(f"both {name} and {name}_FILE are set: set one of them")
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{name}_FILE={file!r} cannot be read ({reason})") from None
    return text.removesuffix("\n").removesuffix("\r")


def check_checkpoint_model(cfg: Config, checkpoint_model: str | None,
                           same: Callable[[str, str], bool] | None = None) -> None:
    """A resume or fine-tune trains the checkpoint's model: a MODEL_NAME given explicitly that
    names another is a configuration error (naming both), not a setting silently ignored.

    `same(model_name, checkpoint_model)` decides what counts as the same model (default: equal
    names); a MODEL_NAME left to its default never conflicts.
    """
    wanted = cfg.get("MODEL_NAME")
    if not cfg.given("MODEL_NAME") or not wanted or not checkpoint_model:
        return
    if not (same or (lambda a, b: a == b))(wanted, checkpoint_model):
        raise ConfigError(
            f"MODEL_NAME={wanted} but CHECKPOINT_PATH={cfg.get('CHECKPOINT_PATH')} holds a "
            f"{checkpoint_model} model: unset MODEL_NAME to train the checkpoint's model, or "
            f"unset CHECKPOINT_PATH to train {wanted}")


def settings_markdown(settings: Sequence[Setting]) -> str:
    """The docs table, generated from the declarations (a test keeps the README equal to it)."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        default = "" if s.default is None else f"`{s.default}`"
        if s.required:
            default = "required"
        elif s.required_if:
            other, value = s.required_if
            default = f"required when {other} is set" if value == "*" else (
                f"required when {other}={value}")
        kind = s.kind + (" (secret)" if s.secret else "")
        meaning = s.help + (f" One of: {', '.join(s.choices)}." if s.choices else "")
        rows.append(f"| `{s.name}` | {kind} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _env_setting(name: str, kind: str, default: Any, required: bool,
                 environ: Mapping[str, str] | None) -> Any:
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        if required:
            raise ConfigError(f"missing required settings: {name}")
        return default
    return Setting(name, kind).convert(raw)


def get_env_str(name: str, default: str | None = None, *, required: bool = False,
                environ: Mapping[str, str] | None = None) -> str | None:
    return _env_setting(name, "str", default, required, environ)


def get_env_int(name: str, default: int | None = None, *, required: bool = False,
                environ: Mapping[str, str] | None = None) -> int | None:
    return _env_setting(name, "int", default, required, environ)


def get_env_float(name: str, default: float | None = None, *, required: bool = False,
                  environ: Mapping[str, str] | None = None) -> float | None:
    return _env_setting(name, "float", default, required, environ)


def get_env_bool(name: str, default: bool | None = None, *, required: bool = False,
                 environ: Mapping[str, str] | None = None) -> bool | None:
    return _env_setting(name, "bool", default, required, environ)


def check_required_env(*names: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise one ConfigError naming every missing (or empty) variable."""
    environ = os.environ if environ is None else environ
    missing = [n for n in names if not (environ.get(n) or "").strip()]
    if missing:
        raise ConfigError("missing required settings: " + ", ".join(missing))


def redact_url(url: str) -> str:
    """Drop the password (and query string) from a URL so it can be shown."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


# =============================================================================================
# 3. Capabilities manifest and the pre-launch job validator
# =============================================================================================

# What a trainer can do, generated from code: its own declarations (capabilities.py) plus every
# script's settings table as JSON Schema. `python train.py --capabilities` prints it; tools/sync.py
# keeps the committed capabilities.json current. The platform's UI builds forms from it and calls
# `validate_job_settings` before it launches a job.
#
# `validate_job_settings` never runs inside a job: it is the platform's code, vendored here on
# purpose. It checks a job's values with the very `Setting.convert` the job will parse them with,
# so the platform's pre-check and the job cannot disagree; any trainer's copy is the platform's
# importable validator (standard library only), and the sync tool keeps every copy identical.

MANIFEST_VERSION = 1
SCRIPTS = ("train", "evaluate", "predict", "export")
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "json": "object"}
_DETECTION_METRICS = ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall")
_DETECTION_PER_CLASS = ("ap_50", "ap_50_95", "precision", "recall", "support")


def _own_metrics(suffix: str) -> tuple[str, ...]:
    """Mask (M) or keypoint (P) metrics, which the UI shows beside the box ones."""
    return (f"mAP50{suffix}", f"mAP50-95{suffix}", f"precision{suffix}", f"recall{suffix}")


def _own_per_class(suffix: str) -> tuple[str, ...]:
    return (f"ap_50{suffix}", f"ap_50_95{suffix}", f"precision{suffix}", f"recall{suffix}")


# task -> (primary metric, metrics, per-class metrics): the names the platform's UI reads.
TASK_METRICS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "image_classification": ("accuracy", ("accuracy", "precision", "recall", "f1_score",
                                          "top5_accuracy"),
                             ("precision", "recall", "f1_score", "support")),
    "object_detection": ("mAP@0.5:0.95", _DETECTION_METRICS, _DETECTION_PER_CLASS),
    "instance_segmentation": (
        "mAP50-95(M)", (*_DETECTION_METRICS, *_own_metrics("(M)")),
        (*_DETECTION_PER_CLASS, *_own_per_class("(M)"))),
    "pose_estimation": (
        "mAP50-95(P)", (*_DETECTION_METRICS, *_own_metrics("(P)"), "OKS"),
        (*_DETECTION_PER_CLASS, *_own_per_class("(P)"))),
    # Over pixels; per class `support` counts pixels. Class 0 is `background` (contract §2a).
    "semantic_segmentation": ("mIoU", ("mIoU", "pixel_accuracy", "mean_accuracy"),
                              ("iou", "accuracy", "support")),
}


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task the trainer trains, the metrics its validation reports and the one picking best."""

    task_type: str
    primary_metric: str
    metrics: tuple[str, ...]
    per_class_metrics: tuple[str, ...] = ()

    @classmethod
    def standard(cls, task_type: str) -> TaskInfo:
        """The contract's metric names for `task_type` (see TASK_METRICS)."""
        primary, metrics, per_class = TASK_METRICS[task_type]
        return cls(task_type, primary, metrics, per_class)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str  # a MODEL_NAME value
    task_type: str
    pretrained: bool = False  # pretrained weights exist, so PRETRAINED=true can work


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    name: str
    task_types: tuple[str, ...]
    description: str


DATASET_LAYOUTS = {
    "image_folder": DatasetLayout(
        "image_folder", ("image_classification",),
        "train/<class>/*, val/<class>/* (valid/ and validation/ accepted), optional "
        "test/<class>/*; class order = sorted folder names"),
    "yolo": DatasetLayout(
        "yolo", ("object_detection", "instance_segmentation", "pose_estimation"),
        "data.yaml with names, train, val and optional test (paths relative to the extracted "
        "folder); one labels/*.txt per image"),
    "platform_annotations": DatasetLayout(
        "platform_annotations", ("object_detection", "instance_segmentation",
                                 "semantic_segmentation", "pose_estimation",
                                 "image_classification"),
        "the platform's own format: annotations_<task>.json (or annotations.json), COCO-style or "
        "nested format_version 1.0, beside images/; the split inside the file"),
}


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """An EXPORT_FORMAT value: the file (or folder) it writes and the toolchain it needs."""

    name: str
    file: str  # the exported model's name inside the archive
    requires: tuple[str, ...] = ()  # modules that must import
    needs_gpu: bool = False

    def require(self, *, gpu_available: bool) -> None:
        """Raise one ConfigError naming everything this machine lacks for this format."""
        import importlib

        missing = []
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(f"the {module} package")
        if self.needs_gpu and not gpu_available:
            missing.append("a CUDA GPU")
        if missing:
            raise ConfigError(f"EXPORT_FORMAT={self.name} needs {' and '.join(missing)}, "
                              "which this machine does not have")


EXPORT_ONNX = ExportFormat("onnx", "model.onnx", requires=("onnx",))
EXPORT_TORCHSCRIPT = ExportFormat("torchscript", "model.torchscript")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """A trainer's own declarations (its capabilities.py); settings come from its scripts."""

    framework: str  # display name, e.g. "PyTorch"
    package: str  # the distribution whose installed version is the framework's, e.g. "torch"
    tasks: tuple[TaskInfo, ...]
    models: tuple[ModelInfo, ...]
    dataset_layouts: tuple[DatasetLayout, ...]
    export_formats: tuple[ExportFormat, ...] = ()
    # A regex of MODEL_NAMEs accepted beyond `models` (which is then a catalogue, not the whole
    # list: e.g. any timm name); None: only the listed models.
    model_name_pattern: str | None = None
    options: FrameworkOptions | None = None  # EXTRA_ARGS as typed fields, and presets

    def export_format(self, name: str) -> ExportFormat:
        for fmt in self.export_formats:
            if fmt.name == name:
                return fmt
        supported = ", ".join(f.name for f in self.export_formats) or "none"
        raise ConfigError(f"EXPORT_FORMAT={name!r} is not supported (supported: {supported})")


def installed_version(package: str) -> str | None:
    """A distribution's version without importing it (importing torch takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def pinned_version(requirements: Path, package: str) -> str | None:
    """The exact version a requirements file pins `package` to (`torch==2.14.1`), else None."""
    if not requirements.is_file():
        return None

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pin = re.compile(r"^([A-Za-z0-9][\w.-]*)\s*(?:\[[^\]]*\])?\s*===?\s*([^\s;,#]+)")
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = pin.match(line.strip())
        if match and canonical(match.group(1)) == canonical(package):
            return match.group(2)
    return None


def settings_schema(settings: Sequence[Setting], title: str) -> dict[str, Any]:
    """JSON Schema (2020-12) of a script's settings; a job config is an object of env names.

    A conditional requirement (`required_if`) applies when the setting it depends on is given:
    the platform validates a job's own settings before adding its infrastructure variables.
    """
    properties: dict[str, Any] = {}
    required: list[str] = []
    dependent: dict[str, list[str]] = {}
    conditional: dict[tuple[str, str], list[str]] = {}
    for s in settings:
        prop: dict[str, Any] = {"type": _JSON_TYPES[s.kind], "description": s.help}
        if s.default is not None and not s.secret:
            prop["default"] = s.default
        if s.choices:
            prop["enum"] = list(s.choices)
        if s.minimum is not None:
            prop["minimum"] = s.minimum
        if s.maximum is not None:
            prop["maximum"] = s.maximum
        if s.identifier:
            prop["pattern"] = IDENTIFIER.pattern
        if s.secret:
            prop["writeOnly"] = True
        prop.update({"x-secret": s.secret, "x-group": s.group})
        if not s.secret:  # a secret is never a flag (argv is visible to every process)
            prop["x-flag"] = s.flag
        if s.required:
            required.append(s.name)
        elif s.required_if:
            other, value = s.required_if
            prop["x-required-if"] = {"setting": other, "value": value}
            if value == "*":
                dependent.setdefault(other, []).append(s.name)
            else:
                conditional.setdefault((other, value), []).append(s.name)
        properties[s.name] = prop
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
        "type": "object", "properties": properties, "required": required,
        "additionalProperties": False}
    if dependent:
        schema["dependentRequired"] = dependent
    if conditional:
        schema["allOf"] = [
            {"if": {"properties": {other: {"const": value}}, "required": [other]},
             "then": {"required": names}} for (other, value), names in conditional.items()]
    return schema


def _declaration_problems(caps: Capabilities, scripts: Mapping[str, Sequence[Setting]]
                          ) -> list[str]:
    problems = []
    tasks = {t.task_type for t in caps.tasks}
    if not tasks:
        problems.append("no tasks declared")
    for task in caps.tasks:
        if task.task_type not in TASK_TYPES:
            problems.append(f"task {task.task_type!r} is not one of {', '.join(TASK_TYPES)}")
        if task.primary_metric not in task.metrics:
            problems.append(f"{task.task_type}: primary metric {task.primary_metric!r} is not "
                            "among its metrics")
    for model in caps.models:
        if model.task_type not in tasks:
            problems.append(f"model {model.name!r}: task {model.task_type!r} is not declared")
    for task in sorted(tasks - {t for layout in caps.dataset_layouts for t in layout.task_types}):
        problems.append(f"no dataset layout for task {task!r}")
    if "train" not in scripts:
        problems.append("no train.py")
    export = {s.name: s for s in scripts.get("export", ())}.get("EXPORT_FORMAT")
    declared = sorted(f.name for f in caps.export_formats)
    if export is not None and sorted(export.choices) != declared:
        problems.append(f"export.py's EXPORT_FORMAT choices {sorted(export.choices)} differ "
                        f"from the declared export formats {declared}")
    if export is None and declared:
        problems.append("export formats are declared but there is no export.py")
    if caps.options is not None:
        problems += [f"preset {name}: {problem}" for name, preset in caps.options.presets.items()
                     for problem in caps.options.problems(preset.values)]
    return problems


def build_manifest(trainer: str, capabilities: Capabilities,
                   scripts: Mapping[str, Sequence[Setting]],
                   framework_version: str | None = None) -> dict[str, Any]:
    """The capabilities manifest: declarations + each script's settings (with the platform's).

    `framework_version` defaults to the installed version of the framework's package.
    """
    problems = _declaration_problems(capabilities, scripts)
    if problems:
        raise ValueError(f"{trainer}: inconsistent capabilities: {'; '.join(problems)}")
    caps = dataclasses.asdict(capabilities)
    manifest = {
        "$comment": "Generated by `python train.py --capabilities` from capabilities.py and the "
                    "scripts' settings tables; regenerate with `python tools/sync.py` from the "
                    "monorepo root. Never edit by hand.",
        "manifest_version": MANIFEST_VERSION,
        "contract_version": CONTRACT_VERSION,
        "trainer": trainer,
        "framework": {"name": caps["framework"], "package": caps["package"],
                      "version": framework_version or installed_version(caps["package"])},
        **{key: caps[key] for key in ("tasks", "models", "model_name_pattern", "dataset_layouts",
                                      "export_formats")},
        "framework_options": options_manifest(capabilities.options),
        "scripts": {name: {"file": f"{name}.py", "settings_schema": with_options_schema(
            settings_schema(merge_settings(PLATFORM_SETTINGS, scripts[name]),
                            f"{name}.py settings"), capabilities.options)}
            for name in SCRIPTS if name in scripts},
    }
    return json.loads(json.dumps(manifest))  # plain JSON types: tuples become lists


def _load_sibling(path: Path) -> Any:
    """Import a trainer module by path; its own `import utils` resolves beside it."""
    import importlib.util

    name = f"_capabilities_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop(name, None)
    return module


def describe_trainer(trainer_dir: Path, trainer: str) -> dict[str, Any]:
    """The manifest of the trainer in `trainer_dir`: capabilities.py + each script's SETTINGS.

    Only those modules are imported (they import utils, nothing heavy): never torch or the
    framework, so this is instant. The framework's version is the one requirements.txt pins
    (what the trainer's image runs), so the manifest does not depend on where it is generated;
    without a pin (in the image, which has no requirements.txt) it is the installed one.
    """
    declarations = trainer_dir / "capabilities.py"
    if not declarations.is_file():
        raise ConfigError(f"trainer {trainer} declares no capabilities ({declarations} with "
                          "CAPABILITIES = utils.Capabilities(...) is missing)")
    scripts = {name: _load_sibling(trainer_dir / f"{name}.py").SETTINGS for name in SCRIPTS
               if (trainer_dir / f"{name}.py").is_file()}
    capabilities = _load_sibling(declarations).CAPABILITIES
    return build_manifest(trainer, capabilities, scripts, pinned_version(
        trainer_dir / "requirements.txt", capabilities.package))


def _as_kind(schema_type: str, value: Any) -> tuple[Any, str | None]:
    """(value, None) when `value` is of the JSON type or a string the trainer parses as it."""
    ok = {"string": lambda v: isinstance(v, str),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": lambda v: isinstance(v, bool),
          "object": lambda v: isinstance(v, dict)}[schema_type]
    if ok(value):
        return value, None
    expected = {"string": "a string", "integer": "an integer", "number": "a number",
                "boolean": "a boolean (true/false/1/0/yes/no)",
                "object": "a JSON object"}[schema_type]
    if isinstance(value, str) and schema_type != "string":
        kind = {v: k for k, v in _JSON_TYPES.items()}[schema_type]
        try:
            return Setting("_", kind).convert(value), None
        except ConfigError:
            pass
    return None, f"is not {expected}"


def validate_job_settings(manifest: Mapping[str, Any], script: str,
                          settings: Mapping[str, Any]) -> list[str]:
    """Every problem with a job's settings for `script` ("train", ...), before launch; [] if none.

    `settings` maps setting names (the env var names) to typed JSON values or to the strings the
    job's environment will hold ("5", "true"); None or "" means unset. Checks: unknown settings,
    types, choices, ranges, required settings (a conditional one when the setting it depends on
    is given), and MODEL_NAME / TASK_TYPE / PRETRAINED against the manifest's models and tasks.
    Each message starts with the offending setting's name; secret values are never repeated.
    """
    scripts = manifest.get("scripts", {})
    if script not in scripts:
        return [f"{script}.py is not a script of this trainer "
                f"(it has: {', '.join(f'{s}.py' for s in scripts)})"]
    schema = scripts[script]["settings_schema"]
    props = schema["properties"]
    problems: list[str] = []
    values: dict[str, Any] = {}
    given = set()
    for name, raw in settings.items():
        prop = props.get(name)
        if prop is None:
            problems.append(f"{name} is not a setting of {script}.py")
            continue
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        given.add(name)
        shown = "<redacted>" if prop.get("x-secret") else repr(raw)
        value, problem = _as_kind(prop["type"], raw)
        if problem is None and "enum" in prop and value not in prop["enum"]:
            problem = f"is not one of {', '.join(map(str, prop['enum']))}"
        elif problem is None and "minimum" in prop and value < prop["minimum"]:
            problem = f"is below the minimum {prop['minimum']:g}"
        elif problem is None and "maximum" in prop and value > prop["maximum"]:
            problem = f"is above the maximum {prop['maximum']:g}"
        elif problem is None and "pattern" in prop and not re.fullmatch(prop["pattern"], value):
            problem = "is not a valid identifier (it names paths and storage keys)"
        if problem:
            problems.append(f"{name}={shown} {problem}")
        else:
            values[name] = value
    for name, prop in props.items():
        condition = prop.get("x-required-if")
        if name in given:
            continue
        if name in schema.get("required", ()):
            problems.append(f"{name} is required")
        elif condition and condition["setting"] in values and condition["value"] in (
                "*", values[condition["setting"]]):
            when = " is set" if condition["value"] == "*" else f"={condition['value']}"
            problems.append(f"{name} is required when {condition['setting']}{when}")
    return problems + _model_problems(manifest, props, values) + _extra_args_problems(
        manifest, props, values)


def _model_problems(manifest: Mapping[str, Any], props: Mapping[str, Any],
                    values: Mapping[str, Any]) -> list[str]:
    """MODEL_NAME, TASK_TYPE and PRETRAINED against the models and tasks the trainer declares."""
    problems = []
    tasks = [t["task_type"] for t in manifest.get("tasks", [])]
    task = values.get("TASK_TYPE")
    if task is not None and tasks and task not in tasks:
        problems.append(f"TASK_TYPE={task!r} is not a task of this trainer ({', '.join(tasks)})")
    models = {m["name"]: m for m in manifest.get("models", [])}
    if "MODEL_NAME" not in props or not models:
        return problems
    name = values.get("MODEL_NAME", props["MODEL_NAME"].get("default"))
    model = models.get(name)
    pattern = manifest.get("model_name_pattern")
    if "MODEL_NAME" in values and model is None and not (
            pattern and re.fullmatch(pattern, str(name))):
        also = f" or a name matching {pattern}" if pattern else ""
        problems.append(f"MODEL_NAME={name!r} is not a model of this trainer "
                        f"({', '.join(models)}{also})")
    if model is not None:
        pretrained = values.get("PRETRAINED", props.get("PRETRAINED", {}).get("default"))
        if pretrained and not model["pretrained"]:
            problems.append(f"PRETRAINED=true but {name} has no pretrained weights")
        # Only a model the job names must fit its task: a trainer may adapt its default model
        # to TASK_TYPE (Ultralytics' yolo11n becomes yolo11n-cls for classification).
        if task is not None and "MODEL_NAME" in values and model["task_type"] != task:
            problems.append(f"MODEL_NAME={name!r} is for {model['task_type']}, not "
                            f"TASK_TYPE={task!r}")
    return problems


# -- framework options -----------------------------------------------------------------------------
# EXTRA_ARGS as a form a UI can render. A trainer declares its framework's options once (its
# options.py): JSON Schema properties (type, default, minimum/maximum or enum, description,
# `x-group`), generated from the framework's own definitions where it has them (tools/sync.py
# writes framework_options.py from the trainer's `generate()`); the options left out, each with
# why; and named presets. The manifest carries the schema in place of EXTRA_ARGS' bare object;
# run_job resolves PRESET + EXTRA_ARGS before any work. The checker covers the subset of JSON
# Schema the declarations use (type, enum, minimum, maximum, no other keys): jsonschema is a
# test dependency only, not one of the images'.

_OPTION_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "array": (lambda v: isinstance(v, list), "a list"),
    "null": (lambda v: v is None, "null"),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named, documented bundle of option values; EXTRA_ARGS overrides single ones."""

    description: str
    values: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class FrameworkOptions:
    """The framework options EXTRA_ARGS may set, those it may not (name -> why), and presets."""

    properties: Mapping[str, Mapping[str, Any]]
    excluded: Mapping[str, str] = dataclasses.field(default_factory=dict)
    presets: Mapping[str, Preset] = dataclasses.field(default_factory=dict)
    source: str = ""  # where the properties come from, e.g. "ultralytics 8.4.190 default.yaml"

    def __post_init__(self) -> None:
        problems = [f"{name}: no type, description or x-group" for name, prop in
                    self.properties.items() if not {"type", "description", "x-group"} <= set(prop)]
        if problems:
            raise ValueError("inconsistent framework options: " + "; ".join(problems))

    def schema(self) -> dict[str, Any]:
        return {"properties": dict(self.properties), "additionalProperties": False}

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        """Every problem with `values` (an EXTRA_ARGS object), each naming option and value."""
        problems = []
        for name, value in values.items():
            prop = self.properties.get(name)
            if prop is None and name in self.excluded:
                problems.append(f"EXTRA_ARGS.{name} cannot be set: {self.excluded[name]}")
            elif prop is None:
                close = [repr(m) for m in _close_matches(name, self.properties)]
                problems.append(f"EXTRA_ARGS.{name} is not an option of this trainer" + (
                    f" (did you mean {' or '.join(close)}?)" if close else ""))
            elif not _option_fits(prop, value):
                problems.append(f"EXTRA_ARGS.{name}={value!r} is not {allowed_values(prop)}")
        return problems

    def resolve(self, preset: str | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """PRESET's values with EXTRA_ARGS over them; one ConfigError naming every problem."""
        problems = self.problems(extra or {})
        if preset and preset not in self.presets:
            problems.insert(0, f"PRESET={preset!r} is not a preset of this trainer (presets: "
                            f"{', '.join(self.presets) or 'none'})")
        if problems:
            raise ConfigError("; ".join(problems))
        return {**(self.presets[preset].values if preset else {}), **(extra or {})}


def _close_matches(name: str, names: Iterable[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(names), n=1)


def _option_fits(prop: Mapping[str, Any], value: Any) -> bool:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    if not any(_OPTION_TYPES[t][0](value) for t in types):
        return False
    if "enum" in prop and value not in prop["enum"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return prop.get("minimum", value) <= value <= prop.get("maximum", value)
    return True


def allowed_values(prop: Mapping[str, Any]) -> str:
    """What an option accepts, in words: "a number from 0 to 1", "one of 'batch', 'pair'"."""
    if "enum" in prop:
        return "one of " + ", ".join(map(repr, prop["enum"]))
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    words = " or ".join(_OPTION_TYPES[t][1] for t in types)
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        return f"{words} from {low:g} to {high:g}"
    if low is not None or high is not None:
        return f"{words} {'>=' if low is not None else '<='} {low if high is None else high:g}"
    return words


def options_manifest(options: FrameworkOptions | None) -> dict[str, Any] | None:
    """The manifest's `framework_options`: where the schema comes from, exclusions, presets."""
    if options is None:
        return None
    return {"source": options.source, "excluded": dict(options.excluded),
            "presets": {name: {"description": p.description, "values": dict(p.values)}
                        for name, p in options.presets.items()}}


def with_options_schema(schema: dict[str, Any], options: FrameworkOptions | None
                        ) -> dict[str, Any]:
    """A script's settings schema with EXTRA_ARGS typed field by field and PRESET's choices."""
    props = schema["properties"]
    if options is not None and "EXTRA_ARGS" in props:
        props["EXTRA_ARGS"].update(options.schema())
        if "PRESET" in props and options.presets:
            props["PRESET"]["enum"] = list(options.presets)
    return schema


def apply_options(cfg: Config, options: FrameworkOptions | None) -> Config:
    """`cfg` with EXTRA_ARGS resolved (PRESET's values, EXTRA_ARGS over them) and checked."""
    if "EXTRA_ARGS" not in cfg._settings:
        return cfg
    preset = cfg.get("PRESET") if "PRESET" in cfg._settings else None
    if options is None:
        if preset:
            raise ConfigError(f"PRESET={preset!r}: this trainer declares no presets")
        return cfg
    return dataclasses.replace(cfg, extra_args=options.resolve(preset, cfg.get("EXTRA_ARGS")))


def option_params(cfg: Config) -> dict[str, Any]:
    """The resolved framework options as MLflow params: `extra.mosaic`, ..."""
    extra = cfg.get("EXTRA_ARGS") if "EXTRA_ARGS" in cfg._settings else None
    return {f"extra.{name}": value for name, value in (extra or {}).items()}


def _extra_args_problems(manifest: Mapping[str, Any], props: Mapping[str, Any],
                         values: Mapping[str, Any]) -> list[str]:
    """A job's EXTRA_ARGS against the options schema in the manifest (validate_job_settings)."""
    prop = props.get("EXTRA_ARGS", {})
    if "properties" not in prop or not isinstance(values.get("EXTRA_ARGS"), dict):
        return []
    excluded = (manifest.get("framework_options") or {}).get("excluded", {})
    return FrameworkOptions(prop["properties"], excluded).problems(values["EXTRA_ARGS"])


# =============================================================================================
# 4. Storage
# =============================================================================================

_ARCHIVE_MAX_RATIO = 200  # uncompressed / compressed, above which an archive is a bomb
_ARCHIVE_RATIO_FLOOR = 64 * 2**20  # ratios only matter for archives past this size
_ARCHIVE_MAX_BYTES = 1 << 40  # 1 TiB declared: absurd for one job's dataset
_IGNORED_TOP_LEVEL = {"__MACOSX", ".DS_Store"}


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


# botocore's timeouts bound each socket read: an endpoint that trickles its answers never trips
# them. Every S3 call also has a total: STORAGE_CALL_S, plus a second per STORAGE_MIN_RATE
# bytes it moves (slower than that on average is a stalled endpoint, not a slow link).
STORAGE_CALL_S = 120.0
STORAGE_MIN_RATE = 256 * 1024


class Storage:
    """One bucket: S3-compatible (MinIO, R2, S3) through boto3, or a local folder."""

    def __init__(self, kind: str, bucket: str, *, endpoint: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 local_root: str | os.PathLike | None = None, ca_bundle: str | None = None):
        self.kind, self.bucket, self.endpoint = kind, bucket, endpoint
        self.ca_bundle = ca_bundle  # None: botocore's default (AWS_CA_BUNDLE, else the system's)
        self._credentials = (access_key, secret_key)
        self.local_root = Path(local_root).resolve() if local_root else None
        self._client = None
        self._lock = threading.Lock()
        self.call_s, self.min_rate = STORAGE_CALL_S, STORAGE_MIN_RATE

    def _within(self, call: Callable[[], Any], nbytes: int = 0) -> Any:
        """`call()` (one S3 call, boto3's own retries included) within its total deadline."""
        return run_within(call, self.call_s + nbytes / self.min_rate, "storage")

    @classmethod
    def from_config(cls, cfg: Config) -> Storage:
        kind = cfg.storage_type
        if kind == "local":
            return cls(kind, cfg.storage_bucket, local_root=cfg.local_storage_root)
        ca_bundle = getattr(cfg, "ca_bundle", None) or None
        if kind == "minio":
            return cls(kind, cfg.storage_bucket, endpoint=cfg.minio_endpoint,
                       access_key=cfg.minio_access_key, secret_key=cfg.minio_secret_key,
                       ca_bundle=ca_bundle)
        if kind == "r2":
            return cls(kind, cfg.storage_bucket, endpoint=cfg.r2_endpoint,
                       access_key=cfg.r2_access_key_id, secret_key=cfg.r2_secret_access_key,
                       ca_bundle=ca_bundle)
        return cls(kind, cfg.storage_bucket, endpoint=cfg.s3_endpoint_url, ca_bundle=ca_bundle)

    # -- addressing ----------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        if self.kind == "local":
            return self.local_file(key).as_uri()
        return f"s3://{self.bucket}/{key}"

    def local_file(self, key: str) -> Path:
        """The local backend's file for `key`; a key that resolves outside the root (`..`, an
        absolute path, a link out), whatever produced it, is refused."""
        target = (self.local_root / key).resolve()
        if target != self.local_root and self.local_root not in target.parents:
            raise StorageError(f"storage key {key!r} resolves outside LOCAL_STORAGE_ROOT "
                               f"({self.local_root}): refused")
        return target

    def split(self, path: str) -> tuple[str, str]:
        """(bucket, key) of a storage key, an s3://bucket/key URI or a file:// URI."""
        if path.startswith("s3://"):
            bucket, _, key = path[5:].partition("/")
            return bucket, key
        if path.startswith("file://") and self.local_root:
            full = Path(urlsplit(path).path).resolve()
            if self.local_root not in full.parents:
                raise StorageError(f"{path} is outside LOCAL_STORAGE_ROOT ({self.local_root})")
            return self.bucket, full.relative_to(self.local_root).as_posix()
        return self.bucket, path.lstrip("/")

    def _where(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key}" if self.kind != "local" else f"{self.local_root}/{key}"

    # -- boto3 ---------------------------------------------------------------------------------
    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig

                access_key, secret_key = self._credentials
                self._client = boto3.client(
                    "s3", endpoint_url=self.endpoint or None, verify=self.ca_bundle,
                    aws_access_key_id=access_key or None,
                    aws_secret_access_key=secret_key or None,
                    region_name="auto" if self.kind == "r2" else None,
                    config=BotoConfig(
                        signature_version="s3v4", connect_timeout=5, read_timeout=60,
                        retries={"mode": "standard", "max_attempts": 5},
                        max_pool_connections=32,
                        s3={"addressing_style": "path" if self.kind == "minio" else "auto"}))
            return self._client

    @staticmethod
    def _transfer_config():
        from boto3.s3.transfer import TransferConfig

        # Large parts and many threads: staging a dataset is bandwidth-bound, not CPU-bound.
        return TransferConfig(multipart_threshold=32 * 2**20, multipart_chunksize=32 * 2**20,
                              max_concurrency=16, use_threads=True)

    def _error(self, exc: Exception, bucket: str, key: str, action: str) -> StorageError:
        where = self._where(bucket, key)
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            SSLError,
        )

        # upload_file wraps the ClientError (403, NoSuchBucket, ...) in S3UploadFailedError,
        # whose message is the raw botocore text: classify the cause instead.
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound"):
                return StorageError(f"{where} not found")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {bucket!r} does not exist ({where})")
            if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch"):
                return StorageError(f"access denied while {action} {where} "
                                    "(check the storage credentials)")
            return StorageError(f"storage error while {action} {where}: {code or status}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"no storage credentials for {where}")
        if isinstance(exc, SSLError):
            return StorageError(f"TLS certificate verification failed for the storage endpoint "
                                f"{redact_url(self.endpoint or 'default')} while {action} {where} "
                                "(a private CA: set CA_BUNDLE or AWS_CA_BUNDLE)")
        if isinstance(exc, TimeoutError):  # run_within: answers trickled past the total
            return StorageError(f"storage endpoint {redact_url(self.endpoint or 'default')} "
                                f"too slow while {action} {where}: {exc}")
        if isinstance(exc, EndpointConnectionError) or "Connect" in type(exc).__name__:
            return StorageError(f"storage endpoint {redact_url(self.endpoint or 'default')} "
                                f"unreachable while {action} {where}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"storage error while {action} {where}: {type(exc).__name__}")
        return StorageError(f"storage error while {action} {where}: {exc}")

    # -- operations ----------------------------------------------------------------------------
    def head(self, path: str) -> ObjectInfo:
        bucket, key = self.split(path)
        if self.kind == "local":
            file = self.local_file(key)
            if not file.is_file():
                raise StorageError(f"{self._where(bucket, key)} not found")
            st = file.stat()
            return ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
        try:
            meta = self._within(lambda: self.client.head_object(Bucket=bucket, Key=key))
        except Exception as exc:
            raise self._error(exc, bucket, key, "reading") from exc
        return ObjectInfo(key, int(meta["ContentLength"]), meta["ETag"].strip('"'))

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` with its size and ETag (local: size and mtime)."""
        bucket, prefix = self.split(prefix)
        if self.kind == "local":
            root = self.local_file(prefix)
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
            return [ObjectInfo(p.relative_to(self.local_root).as_posix(), st.st_size,
                               f"{st.st_size}-{st.st_mtime_ns}")
                    for p in files for st in (p.stat(),)]
        objects: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix):
                objects.extend(ObjectInfo(obj["Key"], int(obj["Size"]), obj["ETag"].strip('"'))
                               for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._error(exc, bucket, prefix, "listing") from exc
        return objects

    def download(self, path: str, dest: Path, *, size: int | None = None) -> Path:
        """Fetch an object to `dest` atomically (a partial download never looks complete)."""
        bucket, key = self.split(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        if self.kind == "local":
            source = self.local_file(key)
            if not source.is_file():
                raise StorageError(f"{self._where(bucket, key)} not found")
            shutil.copyfile(source, partial)
        else:
            size = self.head(path).size if size is None else size  # the deadline grows with it
            progress = _Progress(f"download {key}", size)
            try:
                self._within(lambda: self.client.download_file(
                    bucket, key, str(partial), Callback=progress.update,
                    Config=self._transfer_config()), size or 0)
            except Exception as exc:
                partial.unlink(missing_ok=True)
                raise self._error(exc, bucket, key, "downloading") from exc
            finally:
                progress.close()
        os.replace(partial, dest)
        return dest

    def upload(self, local_path: str | os.PathLike, path: str, *,
               metadata: Mapping[str, str] | None = None) -> str:
        """`metadata`: S3 user metadata (x-amz-meta-*), kept by server-side copies; a local
        bucket has none."""
        bucket, key = self.split(path)
        local_path = Path(local_path)
        if self.kind == "local":
            return self._local_put(local_path, key)
        extra = {"Metadata": dict(metadata)} if metadata else None
        try:
            self._within(lambda: self.client.upload_file(
                str(local_path), bucket, key, ExtraArgs=extra, Config=self._transfer_config()),
                local_path.stat().st_size)
        except Exception as exc:
            raise self._error(exc, bucket, key, "uploading") from exc
        return f"s3://{bucket}/{key}"

    def _local_put(self, source: Path, key: str) -> str:
        """Copy a file into the local bucket; readers never see a half-written object.

        A copy, not a link: the caller's file may be rewritten in place after the upload.
        """
        target = self.local_file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return target.as_uri()

    def copy(self, source: str, path: str) -> str:
        """Copy an object within the storage; the bytes never pass through this machine."""
        src_bucket, src_key = self.split(source)
        bucket, key = self.split(path)
        if self.kind == "local":
            # Objects here are only ever replaced (`_local_put`), so a hard link is a safe copy.
            return link_or_copy(self.local_file(src_key), self.local_file(key)).as_uri()
        try:
            # The managed copy: one CopyObject, or UploadPartCopy parts past 5 GB.
            self._within(lambda: self.client.copy({"Bucket": src_bucket, "Key": src_key},
                                                  bucket, key, Config=self._transfer_config()))
        except Exception as exc:
            raise self._error(exc, bucket, key, "copying to") from exc
        return f"s3://{bucket}/{key}"

    def delete(self, path: str) -> None:
        """Remove an object; one that is already gone is not an error."""
        bucket, key = self.split(path)
        if self.kind == "local":
            (self.local_root / key).unlink(missing_ok=True)
            return
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise self._error(exc, bucket, key, "deleting") from exc

    def list(self, prefix: str) -> list[str]:
        bucket, prefix = self.split(prefix)
        if self.kind == "local":
            root = self.local_file(prefix)
            return sorted(p.relative_to(self.local_root).as_posix()
                          for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        keys: list[str] = []
        try:
            pages = iter(self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix))
            while (page := self._within(lambda: next(pages, None))) is not None:
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._error(exc, bucket, prefix, "listing") from exc
        return keys


class _Progress:
    """A tqdm bar on a terminal, a log line every ~10 % (or 30 s) otherwise. Thread-safe."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.done = label, total, 0
        self._lock = threading.Lock()
        self._bar = None
        self._next_log = time.monotonic() + 30
        self._next_fraction = 0.1
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            fraction = self.done / self.total if self.total else 0.0
            if fraction >= self._next_fraction or time.monotonic() >= self._next_log:
                log.info("%s: %.0f MB%s", self.label, self.done / 2**20,
                         f" ({fraction:.0%})" if self.total else "")
                self._next_fraction = fraction + 0.1
                self._next_log = time.monotonic() + 30

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# =============================================================================================
# 5. Dataset staging
# =============================================================================================

def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a '..' path"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)
                 or stat.S_ISSOCK(mode)):
        return "a device or special file"
    return None


def check_archive(archive: Path, *, label: str, compressed_size: int) -> int:
    """Reject unsafe members and absurd sizes; return the total uncompressed size."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{label} is not a valid zip archive ({exc})") from None
    with zf:
        return _check_members(zf, label=label, compressed_size=compressed_size)


def _check_members(zf: zipfile.ZipFile, *, label: str, compressed_size: int) -> int:
    """`check_archive` on an open archive (its central directory is all it reads)."""
    total = 0
    for info in zf.infolist():
        problem = _member_problem(info)
        if problem:
            raise DatasetError(f"{label} is unsafe: member {info.filename!r} is {problem}")
        total += info.file_size
    ratio = total / max(compressed_size, 1)
    if total > _ARCHIVE_MAX_BYTES or (total > _ARCHIVE_RATIO_FLOOR and ratio > _ARCHIVE_MAX_RATIO):
        raise DatasetError(f"{label} looks like a zip bomb: {total / 2**20:.0f} MB declared "
                           f"from {compressed_size / 2**20:.1f} MB (ratio {ratio:.0f})")
    return total


def extract_archive(archive: Path, dest: Path, *, label: str) -> None:
    """Extract members checked by `check_archive`, never writing more than each one declares."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _extract_member(zf, info, dest, label=label)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{label} is corrupt ({exc})") from None


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, *,
                    label: str) -> None:
    target = dest / info.filename.replace("\\", "/")
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > info.file_size:
                raise DatasetError(f"{label}: member {info.filename!r} is larger than it "
                                   "declares")
            out.write(chunk)


def dataset_root(extracted: Path) -> Path:
    """Unwrap a single top-level folder (`sample/train/...` -> `sample`)."""
    entries = [p for p in extracted.iterdir() if p.name not in _IGNORED_TOP_LEVEL]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def _free_bytes(path: Path, budget_mb: int | None) -> int:
    free = shutil.disk_usage(path).free
    return free if budget_mb is None else min(free, budget_mb * 2**20)


_PART_BYTES = 64 * 2**20  # a dataset is fetched in ranged GETs of at least this size ...
_PART_THREADS = 8  # ... and at most this many at once
_TAIL_BYTES = 2**20  # first read of an archive's end: its central directory, usually all of it


class _ShortRead(Exception):
    """The server closed a ranged GET before its last byte."""


class _RangedDownload:
    """One object fetched into a local file by parallel ranged GETs, written where each byte
    belongs, with a record of which ranges have arrived: a reader may use a range (`wait_for`)
    before the whole object is in. A broken stream resumes where it stopped (5 tries a part).
    """

    def __init__(self, storage: Storage, key: str, size: int, path: Path, progress: _Progress):
        self.storage, self.size, self.path, self.progress = storage, size, path, progress
        self.bucket, self.key = storage.split(key)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, size)  # sparse: takes disk space only as the bytes arrive
        self._parts: list[list[int]] = []  # [start, end, bytes arrived from start]
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def fetch(self, start: int, end: int) -> None:
        """Bytes [start, end), now, in this thread."""
        self._get_within(start, end, None)

    def start(self, end: int) -> None:
        """Bytes [0, end) in the background: up to _PART_THREADS parts of >= _PART_BYTES."""
        count = max(1, min(_PART_THREADS, -(-end // _PART_BYTES)))
        bounds = [end * i // count for i in range(count + 1)]
        self._parts = [[a, b, 0] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        for part in self._parts:
            thread = threading.Thread(target=self._run_part, args=(part,), daemon=True,
                                      name=f"download-{part[0]}")
            thread.start()
            self._threads.append(thread)

    def _run_part(self, part: list[int]) -> None:
        try:
            self._get_within(part[0], part[1], part)
        except BaseException as exc:  # handed to the reader, which raises it
            with self._changed:
                self._error = self._error or exc
                self._changed.notify_all()

    def _get_within(self, start: int, end: int, part: list[int] | None) -> None:
        """`_get` within the storage's total deadline for its bytes; an abandoned one stops at
        its next chunk once the download is closed."""
        try:
            self.storage._within(lambda: self._get(start, end, part), end - start)
        except TimeoutError as exc:
            raise self.storage._error(exc, self.bucket, self.key, "downloading") from None

    def _get(self, start: int, end: int, part: list[int] | None) -> None:
        from botocore.exceptions import BotoCoreError

        offset, tries = start, 0
        while offset < end and not self._stop.is_set():
            try:
                body = self.storage.client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{end - 1}")["Body"]
                while offset < end and not self._stop.is_set():
                    chunk = body.read(min(2**20, end - offset))
                    if not chunk:
                        raise _ShortRead(f"stream ended at byte {offset} of {end}")
                    os.pwrite(self._fd, chunk, offset)
                    offset += len(chunk)
                    self.progress.update(len(chunk))
                    if part is not None:
                        with self._changed:
                            part[2] = offset - part[0]
                            self._changed.notify_all()
            except (BotoCoreError, _ShortRead) as exc:  # the client retried the request itself
                tries += 1
                if tries >= 5:
                    raise self.storage._error(exc, self.bucket, self.key, "downloading") from exc
                time.sleep(0.25 * 2**tries)
            except Exception as exc:
                raise self.storage._error(exc, self.bucket, self.key, "downloading") from exc

    def _arrived(self, start: int, end: int) -> bool:
        """Bytes outside the parts (the tail) were fetched before the parts started."""
        for a, b, done in self._parts:
            if start < b and end > a and min(end, b) > a + done:
                return False
        return True

    def wait_for(self, start: int, end: int) -> None:
        """Return once bytes [start, end) are in the file; raise the first download error."""
        with self._changed:
            while not self._arrived(start, end):
                if self._error is not None:
                    raise self._error
                self._changed.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)  # a part stops at its next chunk; daemons, should a read hang
        os.close(self._fd)


def _open_remote_zip(download: _RangedDownload, label: str) -> tuple[zipfile.ZipFile, int]:
    """Fetch the archive's end until its central directory reads; (archive, first byte read).

    Bytes not fetched yet read as zeros, so a central directory that begins before the fetched
    tail fails its signature check and a bigger tail is fetched (x8, up to the whole object).
    """
    size, fetched_from, want = download.size, download.size, min(download.size, _TAIL_BYTES)
    while True:
        start = size - want
        download.fetch(start, fetched_from)
        fetched_from = start
        raw = open(download.path, "rb", buffering=0)  # unbuffered: never a stale read-ahead
        try:
            return zipfile.ZipFile(raw), start
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raw.close()
            if start == 0:
                raise DatasetError(f"{label} is not a valid zip archive ({exc})") from None
            want = min(size, want * 8)


def _fetch_and_extract(storage: Storage, key: str, size: int, entry: Path, *, label: str,
                       disk_budget_mb: int | None) -> None:
    """Stage an archive from S3, extracting each member while the rest is still downloading.

    The central directory (the archive's end) is fetched first, so every member is checked
    (`check_archive`'s rules) and the disk space is known before any data is fetched; then the
    data arrives in parallel ranged GETs while the members are extracted in archive order, each
    as soon as its bytes are in. The archive file is removed at the end.
    """
    archive = entry / "archive.zip"
    progress = _Progress(f"download {key}", size)
    download = _RangedDownload(storage, key, size, archive, progress)
    zf = None
    try:
        zf, tail_start = _open_remote_zip(download, label)
        total = _check_members(zf, label=label, compressed_size=size)
        free = _free_bytes(entry, disk_budget_mb) - tail_start  # the archive's rest comes too
        if total > free:
            raise DatasetError(f"not enough disk space to extract {key}: {total / 2**20:.0f} MB "
                               f"needed, {max(free, 0) / 2**20:.0f} MB free in {entry}")
        download.start(tail_start)
        members = sorted(zf.infolist(), key=lambda info: info.header_offset)
        ends = [info.header_offset for info in members[1:]] + [size]
        dest = entry / "data"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for info, end in zip(members, ends, strict=True):
                download.wait_for(info.header_offset, end)
                _extract_member(zf, info, dest, label=label)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise DatasetError(f"{label} is corrupt ({exc})") from None
    finally:
        if zf is not None:
            raw = zf.fp
            zf.close()  # leaves a file object it was given open
            if raw is not None:
                raw.close()
        download.close()
        progress.close()
        archive.unlink(missing_ok=True)


def stage_dataset(storage: Storage, dataset_id: str, cache_dir: Path,
                  disk_budget_mb: int | None = None) -> Path:
    """Stage `datasets/{id}.zip`, else the folder `datasets/{id}/`, into the cache; its root.

    The archive wins when both exist. See `stage_dataset_version`, which also returns the
    version staged (the archive's ETag, or the digest of the folder's manifest).
    """
    return stage_dataset_version(storage, dataset_id, cache_dir, disk_budget_mb)[0]


def stage_dataset_version(storage: Storage, dataset_id: str, cache_dir: Path,
                          disk_budget_mb: int | None = None) -> tuple[Path, str]:
    """(the staged dataset's root, its version): the archive, else the folder (`stage_folder`)."""
    check_identifier("DATASET_ID", dataset_id)
    key, prefix = f"datasets/{dataset_id}.zip", f"datasets/{dataset_id}/"
    try:
        info = storage.head(key)
    except StorageError as missing:
        if "not found" not in str(missing):
            raise
        objects = storage.list_objects(prefix)
        if not objects:
            raise StorageError(f"{missing} (nor the folder {storage.uri(prefix)})") from None
        return stage_folder(storage, dataset_id, prefix, objects, cache_dir, disk_budget_mb)
    return _stage_archive(storage, dataset_id, info, cache_dir, disk_budget_mb)


def _key_problem(key: str, prefix: str) -> str | None:
    """Why an object of a dataset folder may not be written under the cache, or None."""
    if not key.startswith(prefix):
        return "outside the prefix"
    name = key[len(prefix):].replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a '..' path"
    return None


def folder_object_key(image: Path) -> str | None:
    """The storage key an image of a staged dataset *folder* came from, or None (an archive's
    member, or a file outside the dataset cache): the cache entry's marker names the prefix,
    and the entry's `data/` mirrors the keys under it."""
    image = Path(image).resolve()
    for entry in image.parents:
        marker = entry / "complete.json"
        if marker.is_file():
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                found = json.loads(marker.read_text(encoding="utf-8"))
                if found.get("manifest_digest") and image.is_relative_to(entry / "data"):
                    return found["key"] + image.relative_to(entry / "data").as_posix()
            return None
    return None


_FOLDER_THREADS = 32  # objects fetched at once from a dataset folder (small files: latency-bound)
_WHOLE_GET_BYTES = 8 * 2**20  # a folder's object up to this size: one GET, read into memory


def stage_folder(storage: Storage, dataset_id: str, prefix: str, objects: Sequence[ObjectInfo],
                 cache_dir: Path, disk_budget_mb: int | None = None) -> tuple[Path, str]:
    """Stage a dataset folder (an object prefix): many objects fetched at once (`_fetch_objects`:
    a small one in one GET, a large one in parallel ranged GETs; retries and resumption of a
    broken stream either way), one progress bar.

    The cache entry is keyed by a digest of the folder's manifest (every key, size and ETag): a
    retried job with an unchanged folder downloads nothing, and any changed object re-stages it.
    Keys are checked like an archive's members before anything is fetched.
    """
    label = storage.uri(prefix)
    for obj in objects:
        problem = _key_problem(obj.key, prefix)
        if problem:
            raise DatasetError(f"{label} is unsafe: key {obj.key!r} is {problem}")
    files = sorted((o for o in objects if not o.key.endswith("/")), key=lambda o: o.key)
    manifest = [[o.key[len(prefix):], o.size, o.etag] for o in files]
    digest = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()[:32]
    entry = cache_dir / "datasets" / dataset_id / f"folder-{digest}"
    marker = entry / "complete.json"
    if marker.is_file():
        root = entry / json.loads(marker.read_text())["root"]
        log.info("dataset %s: cache hit (%s)", dataset_id, root)
        return root, digest
    if entry.exists():
        shutil.rmtree(entry)  # a previous attempt died half-way
    total = sum(o.size for o in files)
    log.info("dataset %s: staging %s (%d objects, %.1f MB)", dataset_id, label, len(files),
             total / 2**20)
    entry.mkdir(parents=True)
    free = _free_bytes(entry, disk_budget_mb)
    if total > free:
        raise DatasetError(f"not enough disk space for {label}: {total / 2**20:.0f} MB needed, "
                           f"{free / 2**20:.0f} MB free in {entry}")
    started = time.monotonic()
    dest = entry / "data"
    progress = _Progress(f"download {prefix}", total)
    try:
        _fetch_objects(storage, files, prefix, dest, progress)
    finally:
        progress.close()
    (entry / "manifest.json").write_text(json.dumps(manifest))
    root = dataset_root(dest)
    marker.write_text(json.dumps({"root": root.relative_to(entry).as_posix(), "key": prefix,
                                  "manifest_digest": digest}))
    log.info("dataset %s: %d objects, %.1f MB staged in %.1f s -> %s", dataset_id, len(files),
             total / 2**20, time.monotonic() - started, root)
    return root, digest


def _fetch_objects(storage: Storage, files: Sequence[ObjectInfo], prefix: str, dest: Path,
                   progress: _Progress) -> None:
    """Every object into `dest`, `_FOLDER_THREADS` at a time; the first failure stops the rest.

    Per object, only what it needs: its folder was made once (per folder), a small one is one
    plain GET (the listing gave its size and ETag: no HEAD, no range) written with one
    `os.write`; a larger one streams to its file through `_RangedDownload` (in parallel ranged
    parts past _PART_BYTES).
    The worker threads are daemons under one deadline for the whole folder (STORAGE_CALL_S plus
    its bytes at STORAGE_MIN_RATE, as `Storage._within` gives one call): a stalled endpoint fails
    the staging in bounded time, without a watchdog thread per object.
    """
    base = str(dest)
    targets = [os.path.join(base, o.key[len(prefix):]) for o in files]
    for folder in set(map(os.path.dirname, targets)):
        os.makedirs(folder, exist_ok=True)
    work = iter(zip(files, targets, strict=True))
    lock, stop, errors = threading.Lock(), threading.Event(), []
    batch = max(1, len(files) // 100)  # progress: one update per ~1 % of the objects per thread

    def fetch(obj: ObjectInfo, target: str) -> None:
        if storage.kind == "local":
            shutil.copyfile(storage.local_file(obj.key), target)
        elif obj.size > _WHOLE_GET_BYTES:
            download = _RangedDownload(storage, obj.key, obj.size, Path(target), progress)
            try:
                download.start(obj.size)
                download.wait_for(0, obj.size)
            finally:
                download.close()
        else:
            _fetch_small_object(storage, obj, target, stop)

    def worker() -> None:
        done = objects = 0
        try:
            while not stop.is_set():
                with lock:
                    item = next(work, None)
                if item is None:
                    break
                fetch(*item)
                if item[0].size <= _WHOLE_GET_BYTES or storage.kind == "local":
                    done += item[0].size  # a ranged download reports its own progress
                objects += 1
                if objects % batch == 0:
                    progress.update(done)
                    done = 0
        except BaseException as exc:  # the first failure is raised by the caller
            with lock:
                errors.append(exc)
            stop.set()
        finally:
            progress.update(done)

    threads = [threading.Thread(target=worker, name=f"stage-{i}", daemon=True)
               for i in range(min(_FOLDER_THREADS, len(files)))]
    for thread in threads:
        thread.start()
    allowed = storage.call_s + sum(o.size for o in files) / storage.min_rate
    deadline = time.monotonic() + allowed
    try:
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
    finally:  # a deadline, or a signal's exception here: the threads stop at their next object
        if any(thread.is_alive() for thread in threads):
            stop.set()
    if any(thread.is_alive() for thread in threads):
        if not errors:
            bucket, key = storage.split(prefix)
            raise storage._error(TimeoutError(f"storage: not every object arrived within "
                                              f"{allowed:.1f} s"), bucket, key, "downloading")
    if errors:
        raise errors[0]


def _fetch_small_object(storage: Storage, obj: ObjectInfo, target: str,
                        stop: threading.Event) -> None:
    """`obj` (at most _WHOLE_GET_BYTES) into `target`: one plain GET read whole, one write.
    A broken stream resumes from its last byte, as `_RangedDownload` does (5 tries)."""
    from botocore.exceptions import BotoCoreError

    bucket, key = storage.split(obj.key)
    chunks: list[bytes] = []
    received = tries = 0
    while not stop.is_set():
        try:
            ranged = {"Range": f"bytes={received}-{obj.size - 1}"} if received else {}
            body = storage.client.get_object(Bucket=bucket, Key=key, **ranged)["Body"]
            while chunk := body.read(2**20):
                chunks.append(chunk)
                received += len(chunk)
            if received != obj.size:
                raise _ShortRead(f"{received} bytes of {obj.size}")
            break
        except (BotoCoreError, _ShortRead) as exc:  # the client retried the request itself
            tries += 1
            if tries >= 5 or received > obj.size:
                raise storage._error(exc, bucket, key, "downloading") from exc
            time.sleep(0.25 * 2**tries)
        except Exception as exc:
            raise storage._error(exc, bucket, key, "downloading") from exc
    if received != obj.size:
        return  # stopped: another object failed, this staging is abandoned
    write_file(target, chunks[0] if len(chunks) == 1 else b"".join(chunks))


def write_file(path: str | os.PathLike, data: bytes, *, new: bool = False) -> None:
    """`data` as the file at `path` with one open and as few writes as the OS allows: no file
    object, no buffering (thousands of small files are staged or converted at a time). `new`:
    the file must not exist yet (O_EXCL)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _stage_archive(storage: Storage, dataset_id: str, info: ObjectInfo, cache_dir: Path,
                   disk_budget_mb: int | None = None) -> tuple[Path, str]:
    """Download `datasets/{id}.zip`, extract it safely into the cache, return its root.

    The cache is keyed by the object's ETag: a retried job on the same machine (same cache dir)
    skips both the download and the extraction, and a changed object is fetched again. From S3
    the members are extracted while the archive downloads (`_fetch_and_extract`).
    """
    key = info.key
    entry = cache_dir / "datasets" / dataset_id / re.sub(r"[^\w.-]", "_", info.etag)
    marker = entry / "complete.json"
    if marker.is_file():
        root = entry / json.loads(marker.read_text())["root"]
        log.info("dataset %s: cache hit (%s)", dataset_id, root)
        return root, info.etag
    if entry.exists():
        shutil.rmtree(entry)  # a previous attempt died half-way
    log.info("dataset %s: staging %s (%.1f MB)", dataset_id, storage.uri(key), info.size / 2**20)
    entry.mkdir(parents=True)
    free = _free_bytes(entry, disk_budget_mb)
    if info.size > free:
        raise DatasetError(f"not enough disk space for {key}: {info.size / 2**20:.0f} MB needed, "
                           f"{free / 2**20:.0f} MB free in {entry}")
    started = time.monotonic()
    label = storage.uri(key)
    if storage.kind != "local":
        _fetch_and_extract(storage, key, info.size, entry, label=label,
                           disk_budget_mb=disk_budget_mb)
    else:
        archive = storage.download(key, entry / "archive.zip", size=info.size)
        total = check_archive(archive, label=label, compressed_size=info.size)
        free = _free_bytes(entry, disk_budget_mb)
        if total > free:
            raise DatasetError(f"not enough disk space to extract {key}: "
                               f"{total / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free in "
                               f"{entry}")
        extract_archive(archive, entry / "data", label=label)
        archive.unlink()
    root = dataset_root(entry / "data")
    marker.write_text(json.dumps({"root": root.relative_to(entry).as_posix(), "key": key,
                                  "etag": info.etag}))
    log.info("dataset %s: %.1f MB staged in %.1f s -> %s", dataset_id, info.size / 2**20,
             time.monotonic() - started, root)
    return root, info.etag


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


# -- images: one safety policy for every trainer --------------------------------------------------
# Unreadable, truncated and oversized images are found when the dataset is checked, before
# training: the job fails with one line naming them, or skips up to MAX_BAD_IMAGES of them with
# one warning. Never a traceback, never a crash mid-epoch.

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (~9459 x 9459), checked by us
IMAGE_CHECK_FILE = "image-check.json"  # the verdicts, beside a staged dataset's complete.json


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be trained on, or None. Reads the header (and for PNG the chunks, for
    JPEG the file's end), never decodes the pixels: a check every image can afford."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    return (f"oversized: {width}x{height} pixels, above the limit of "
                            f"{MAX_IMAGE_PIXELS}")
                image_format = im.format
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"oversized: above the limit of {MAX_IMAGE_PIXELS} pixels (a decompression bomb)"
    except Exception as exc:  # Pillow raises many types for a file it cannot read
        return f"unreadable ({type(exc).__name__})"
    if image_format == "JPEG":
        with open(path, "rb") as fh:  # the end-of-image marker is missing from a cut-off file
            fh.seek(max(path.stat().st_size - 1024, 0))
            if b"\xff\xd9" not in fh.read():
                return "truncated (no JPEG end marker)"
    return None


def _image_check_file(root: Path) -> Path | None:
    """Where a staged dataset keeps its image verdicts: its cache entry is keyed by the
    archive's ETag, so the files never change under the verdict."""
    for folder in (root, *list(root.parents)[:2]):
        if (folder / "complete.json").is_file():
            return folder / IMAGE_CHECK_FILE
    return None


_warned_bad_images: set[str] = set()  # one warning per process for a set of images


def _image_verdicts(images: Sequence[Path], root: Path) -> tuple[str, dict[str, str]]:
    from concurrent.futures import ThreadPoolExecutor

    names = [os.path.relpath(p, root) for p in images]
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
    cache = _image_check_file(root)
    stored: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(cache.read_text(encoding="utf-8")) if cache else {}
    if stored.get("max_pixels") != MAX_IMAGE_PIXELS:
        stored = {"max_pixels": MAX_IMAGE_PIXELS, "verdicts": {}}
    if digest in stored["verdicts"]:
        return digest, stored["verdicts"][digest]
    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads and zlib release the GIL
        problems = list(pool.map(image_problem, images))
    bad = {name: why for name, why in zip(names, problems, strict=True) if why}
    if cache is not None:
        stored["verdicts"][digest] = bad
        with contextlib.suppress(OSError), atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(stored), encoding="utf-8")
    return digest, bad


def check_images(images: Sequence[Path], *, root: Path, max_bad: int = 0) -> list[Path]:
    """The images fit to train on. Bad ones (see `image_problem`) fail the dataset check with
    one line naming them, or, when there are at most `max_bad` (MAX_BAD_IMAGES), are dropped
    with one warning listing them. `root` names the files in messages and finds the cache."""
    digest, bad = _image_verdicts(images, root)
    if not bad:
        return list(images)
    listed = [f"{name}: {why}" for name, why in sorted(bad.items())]
    shown = "; ".join(listed[:5]) + (f"; and {len(listed) - 5} more" if len(listed) > 5 else "")
    if len(bad) > max_bad:
        raise DatasetError(f"{len(bad)} bad image(s) in the dataset (MAX_BAD_IMAGES={max_bad}): "
                           f"{shown}")
    if digest not in _warned_bad_images:
        _warned_bad_images.add(digest)
        log.warning("skipping %d bad image(s) (MAX_BAD_IMAGES=%d): %s", len(bad), max_bad, shown)
    return [p for p, name in zip(images, (os.path.relpath(p, root) for p in images),
                                 strict=True) if name not in bad]


def stage_inputs(storage: Storage, input_path: str, dest: Path) -> list[Path]:
    """The images named by INPUT_PATH, as local files.

    INPUT_PATH is a storage key (or URI) of one image, of a .zip of images, or a prefix ending
    in `/`; a person may also point it at a local file, folder or zip (`--input-path ./images`).
    """
    local = Path(input_path)
    if not input_path.startswith(("s3://", "file://")) and local.exists():
        if local.is_dir():
            images = list_images(local)
        elif local.suffix.lower() == ".zip":
            size = local.stat().st_size
            check_archive(local, label=str(local), compressed_size=size)
            extract_archive(local, dest, label=str(local))
            images = list_images(dest)
        else:
            images = [local.resolve()] if is_image(local) else []
    elif input_path.endswith("/"):
        bucket, prefix = storage.split(input_path)
        for key in storage.list(input_path):
            if is_image(key):
                if ".." in PurePosixPath(key[len(prefix):]).parts:  # a key never names a path
                    raise DatasetError(f"storage key {key!r} would be written outside {dest}")
                storage.download(f"s3://{bucket}/{key}" if storage.kind != "local" else key,
                                 dest / key[len(prefix):])
        images = list_images(dest)
    else:
        _, key = storage.split(input_path)
        file = storage.download(input_path, dest / PurePosixPath(key).name)
        if file.suffix.lower() == ".zip":
            check_archive(file, label=storage.uri(key), compressed_size=file.stat().st_size)
            extract_archive(file, dest / "unzipped", label=storage.uri(key))
            file.unlink()
            images = list_images(dest)
        else:
            images = [file] if is_image(file) else []
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {input_path}")
    return images


# -- platform annotations: the platform's own dataset format (contract §2a) -------------------
# Read here, once for every trainer, into plain records (`PlatformDataset`); each trainer's
# data.py writes them in its framework's layout. Hand-written rather than pycocotools: the
# platform writes polygons, never RLE, and pycocotools would be a compiled dependency in every
# trainer for a JSON walk that is also where the contract's checks and messages live.

ANNOTATION_FILES = {
    "object_detection": "annotations_detection.json",
    "instance_segmentation": "annotations_segmentation.json",
    "semantic_segmentation": "annotations_segmentation.json",
    "pose_estimation": "annotations_pose.json",
    "image_classification": "annotations_classification.json",
}
ANNOTATIONS_FALLBACK = "annotations.json"
BACKGROUND_CLASS = "__background__"
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}


@dataclasses.dataclass(frozen=True)
class AnnotatedObject:
    class_id: int  # 0-based; __background__ is not a class
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels, clipped to the image
    polygons: tuple[tuple[float, ...], ...] = ()  # each (x1, y1, x2, y2, ...) in pixels
    keypoints: tuple[tuple[float, float, int], ...] = ()  # (x, y, v) per keypoint, v 0/1/2


@dataclasses.dataclass(frozen=True)
class AnnotatedImage:
    id: str  # the image's id as a string
    path: Path  # absolute local file
    file_name: str  # relative to images/
    width: int
    height: int
    split: str  # "train" | "val" | "test"
    objects: tuple[AnnotatedObject, ...] = ()
    label: int | None = None  # classification: the class id


@dataclasses.dataclass(frozen=True)
class PlatformDataset:
    annotation_file: Path
    task_type: str
    class_names: tuple[str, ...]
    images: tuple[AnnotatedImage, ...]
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()  # 0-based index pairs
    split_source: str = ""  # "split_config" | "per-image" | "seeded"

    def split(self, name: str) -> list[AnnotatedImage]:
        return [image for image in self.images if image.split == name]

    def split_counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in ("train", "val", "test")}


def find_platform_annotations(root: Path, task_type: str | None) -> Path | None:
    """The task's annotation file at the dataset's root, else `annotations.json`, else None.
    Without a task, the first of the task files found."""
    names = ([ANNOTATION_FILES[task_type]] if task_type in ANNOTATION_FILES
             else list(dict.fromkeys(ANNOTATION_FILES.values())))
    for name in [*names, ANNOTATIONS_FALLBACK]:
        if (root / name).is_file():
            return root / name
    return None


def _load_annotation_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_bytes())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file.name}: malformed JSON ({exc.msg} at line {exc.lineno} "
                           f"column {exc.colno})") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"{file.name}: unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{file.name}: not platform annotations (expected a JSON object with "
                           "an 'images' list)")
    return data


def _files_under(folder: Path) -> set[str]:
    """Every file below `folder`, as POSIX paths relative to it: one walk, not a stat a file."""
    found: set[str] = set()
    for dirpath, _, filenames in os.walk(folder):
        relative = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        found.update(prefix + name for name in filenames)
    return found


def _image_file(file: Path, image_id: str, file_name: Any, present: set[str]) -> str:
    """`file_name` relative to images/, checked: inside images/ and present in the dataset."""
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{file.name}: image {image_id} has no file_name")
    name = file_name.replace("\\", "/")
    name = name[len("images/"):] if name.startswith("images/") else name
    if name not in present:
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
            raise DatasetError(f"{file.name}: image {image_id} file_name {file_name!r} leaves "
                               "images/: refused")
        raise DatasetError(f"{file.name}: image {image_id} ({file_name}) is not in the dataset")
    return name


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _clip_box(box: Any, width: int, height: int) -> tuple[tuple[float, float, float, float] | None,
                                                          bool]:
    """(the box clipped to the image or None when nothing is left, whether it was clipped)."""
    x, y, w, h = map(float, box)
    right, bottom = x + w, y + h
    x0 = x if x > 0.0 else 0.0  # comparisons, not min/max calls: 50k boxes in a large file
    y0 = y if y > 0.0 else 0.0
    x1 = right if right < width else float(width)
    y1 = bottom if bottom < height else float(height)
    clipped = x0 != x or y0 != y or x1 != right or y1 != bottom
    if x1 <= x0 or y1 <= y0:
        return None, clipped
    return (x0, y0, x1 - x0, y1 - y0), clipped


def _seeded_split(ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """The same on every run and machine: a shuffle of the sorted ids by a seeded generator."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    count = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) > 1:
        count = min(max(count, 1), len(order) - 1)
    return {image_id: "val" if i < count else "train" for i, image_id in enumerate(order)}


def _annotation_list(file: Path, annotations: Any) -> list[dict[str, Any]]:
    if annotations is None:
        return []
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(f"{file.name}: 'annotations' is not a list of JSON objects")
    return annotations


_UNKNOWN = object()  # a category id no category has
_ID_TYPES = (int, str)  # what a category id may be (a tuple: `int | str` is built at each use)
_DROPPED = object()  # a box with nothing left inside its image


def _annotated_object(ann: Mapping[str, Any], class_id: int, width: int, height: int,
                      kpt_count: int | None) -> tuple[Any, bool]:
    """(one annotation as an AnnotatedObject, whether its box was clipped); the object is None
    for a classification one (no box, no polygon), _DROPPED for a box wholly outside its image.
    ValueError (or TypeError) names what is wrong with a bad one."""
    keypoints = ann.get("keypoints") or ()
    if keypoints:  # (the branches below are skipped by plain boxes, the common case)
        if kpt_count is None:
            kpt_count = len(keypoints) // 3
        if len(keypoints) != 3 * kpt_count:
            raise ValueError(f"{len(keypoints)} keypoint values, expected {3 * kpt_count} "
                             f"({kpt_count} x, y, v)")
        keypoints = tuple((float(keypoints[i]), float(keypoints[i + 1]), int(keypoints[i + 2]))
                          for i in range(0, len(keypoints), 3))
    segmentation = ann.get("segmentation")
    polygons: tuple[tuple[float, ...], ...] = ()
    if segmentation:
        if isinstance(segmentation, dict):
            raise ValueError("an RLE mask: platform annotations use polygons")
        polygons = tuple(tuple(map(float, polygon)) for polygon in segmentation
                         if len(polygon) >= 6)
    box = ann.get("bbox")
    if box is None and polygons:
        xs = [v for polygon in polygons for v in polygon[0::2]]
        ys = [v for polygon in polygons for v in polygon[1::2]]
        box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
    if box is None:
        return None, False
    if len(box) != 4:
        raise ValueError(f"bbox {box!r} is not [x, y, w, h]")
    bbox, clipped = _clip_box(box, width, height)
    if bbox is None:
        return _DROPPED, clipped
    return AnnotatedObject(class_id, bbox, polygons, keypoints), clipped


def read_platform_annotations(root: Path, task_type: str | None, *, val_fraction: float = 0.2,
                              split_seed: int = 42) -> PlatformDataset:
    """The dataset at `root` read from its platform annotation file (both variants), checked.

    Bad annotations raise DatasetError with one line naming the file and the id; boxes reaching
    outside their image are clipped and zero-area ones dropped, with one warning counting each.
    """
    file = find_platform_annotations(root, task_type)
    if file is None:
        raise DatasetError(f"no platform annotation file in {root.name}/ (expected "
                           f"{ANNOTATION_FILES.get(task_type or '', 'annotations_<task>.json')} "
                           f"or {ANNOTATIONS_FALLBACK})")
    data = _load_annotation_json(file)
    task = task_type or str(data.get("task_type") or "")
    categories = data.get("categories", data.get("classes"))
    if not isinstance(categories, list):
        raise DatasetError(f"{file.name}: no 'categories' (or 'classes') list")
    class_of: dict[Any, int | None] = {}  # category id (as given, and as a string) -> class id
    class_names: list[str] = []
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "name" not in category:
            raise DatasetError(f"{file.name}: category #{position} has no name")
        raw_id = category.get("id", position)
        cat_id = str(raw_id)
        raw_id = raw_id if isinstance(raw_id, int | str) else cat_id
        if category["name"] == BACKGROUND_CLASS:
            class_of[cat_id] = class_of[raw_id] = None
            continue
        class_of[cat_id] = class_of[raw_id] = len(class_names)
        class_names.append(str(category["name"]))
        if category.get("keypoints") and not keypoint_names:
            keypoint_names = tuple(str(k) for k in category["keypoints"])
            pairs = category.get("skeleton") or []
            if any(not (1 <= int(a) <= len(keypoint_names) and 1 <= int(b) <= len(keypoint_names))
                   for a, b in pairs):
                raise DatasetError(f"{file.name}: category {cat_id} skeleton names a keypoint "
                                   f"outside 1..{len(keypoint_names)}")
            skeleton = tuple((int(a) - 1, int(b) - 1) for a, b in pairs)

    nested = "categories" not in data
    records = data["images"]
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{file.name}: images[{position}] is not a JSON object")
    by_image: dict[str, list[dict[str, Any]]] = {}
    if nested:
        for record in records:
            by_image[str(record.get("id"))] = _annotation_list(file, record.get("annotations"))
    else:
        known = {str(record.get("id")) for record in records}
        for ann in _annotation_list(file, data.get("annotations")):
            image_id = str(ann.get("image_id"))
            if image_id not in known:
                raise DatasetError(f"{file.name}: annotation {ann.get('id')} names image "
                                   f"{image_id}, which the file does not list")
            by_image.setdefault(image_id, []).append(ann)

    split_config = (data.get("split_config") or {}).get("splits") or {}
    ids = [str(record.get("id")) for record in records]
    unknown = sorted(set(map(str, split_config)) - set(ids))
    if unknown:
        raise DatasetError(f"{file.name}: split_config names image {unknown[0]}, which the file "
                           "does not list")
    seeded = _seeded_split(ids, val_fraction, split_seed)
    sources: set[str] = set()
    kpt_count = len(keypoint_names) or None
    clipped = dropped = 0
    images: list[AnnotatedImage] = []
    images_dir = root / "images"
    present = _files_under(images_dir)
    for record, image_id in zip(records, ids, strict=True):
        name = _image_file(file, image_id, record.get("file_name"), present)
        path = images_dir / name
        width, height = record.get("width"), record.get("height")
        if not width or not height:
            width, height = _image_size(path)
        raw_split = split_config.get(image_id)
        source = "split_config"
        if raw_split is None:
            raw_split, source = record.get("split"), "per-image"
        if raw_split is None:
            raw_split, source = seeded[image_id], "seeded"
        split = SPLIT_ALIASES.get(str(raw_split).lower())
        if split is None:
            raise DatasetError(f"{file.name}: image {image_id} has split {raw_split!r} (expected "
                               "train, val or test)")
        sources.add(source)
        objects: list[AnnotatedObject] = []
        label = None
        for ann in by_image.get(image_id, ()):
            raw_id = ann.get("category_id")
            if raw_id is None:
                raw_id = ann.get("class_id")
            class_id = class_of.get(raw_id, _UNKNOWN) if isinstance(raw_id, _ID_TYPES) \
                else _UNKNOWN
            if class_id is _UNKNOWN:
                raise DatasetError(f"{file.name}: annotation {ann.get('id')} of image {image_id} "
                                   f"has category id {raw_id}, which no category has")
            if class_id is None:
                continue  # a negative image: kept, with no objects
            try:
                obj, was_clipped = _annotated_object(ann, class_id, width, height, kpt_count)
            except (TypeError, ValueError, IndexError) as exc:
                raise DatasetError(f"{file.name}: annotation {ann.get('id')} of image "
                                   f"{image_id} has {exc}") from None
            if obj is None:  # a classification annotation
                label = class_id if label is None else label
            elif obj is _DROPPED:
                dropped += 1
            else:
                if obj.keypoints and kpt_count is None:
                    kpt_count = len(obj.keypoints)
                clipped += was_clipped
                objects.append(obj)
        if label is None and task == "image_classification" and objects:
            label = objects[0].class_id
        images.append(AnnotatedImage(image_id, path, name, int(width), int(height), split,
                                     tuple(objects), label))
    if clipped or dropped:
        log.warning("%s: %d box(es) reaching outside their image clipped, %d zero-area box(es) "
                    "dropped", file.name, clipped, dropped)
    split_source = next((s for s in ("split_config", "per-image", "seeded") if s in sources), "")
    return PlatformDataset(file, task, tuple(class_names), tuple(images), keypoint_names,
                           skeleton, split_source)


def platform_annotations_layout(*task_types: str) -> DatasetLayout:
    """The platform_annotations layout as a trainer offers it: for the tasks it trains."""
    layout = DATASET_LAYOUTS["platform_annotations"]
    return dataclasses.replace(layout, task_types=task_types or layout.task_types)


def platform_items(dataset: PlatformDataset, split: str,
                   class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """A classification split as (image, class id in `class_names`), matched by class name.
    Images without a class (negatives, unlabelled) are left out, with one log line."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(dataset.class_names) - set(index))
    images = dataset.split(split)
    used = [image for image in images if image.label is not None]
    if unknown and any(dataset.class_names[image.label] in unknown for image in used):
        raise DatasetError(f"{dataset.annotation_file.name}: classes {', '.join(unknown[:5])} "
                           f"are not among the model's ({', '.join(list(class_names)[:10])})")
    if len(used) < len(images):
        log.info("%s: %d %s image(s) without a class left out (negatives or unlabelled)",
                 dataset.annotation_file.name, len(images) - len(used), split)
    if not used:
        raise DatasetError(f"{dataset.annotation_file.name}: no {split} images with a class "
                           f"(split from {dataset.split_source}: {dataset.split_counts()})")
    return [(image.path, index[dataset.class_names[image.label]]) for image in used]


def platform_annotations_if_any(root: Path, task_type: str, *, val_fraction: float = 0.2,
                                split_seed: int = 42) -> PlatformDataset | None:
    """The dataset's platform annotations for `task_type`, or None when it has none (a dataset
    in a framework's own layout)."""
    if find_platform_annotations(root, task_type) is None:
        return None
    return read_platform_annotations(root, task_type, val_fraction=val_fraction,
                                     split_seed=split_seed)


def dataset_format_error(root: Path, layouts: Sequence[DatasetLayout]) -> DatasetError:
    """One line for a dataset in no accepted format: what was found and every format accepted."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()
                     if p.name not in _IGNORED_TOP_LEVEL) if root.is_dir() else []
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    accepted = "; ".join(f"{layout.name} ({layout.description})" for layout in layouts)
    return DatasetError(f"dataset is in no accepted format (found: {shown or 'nothing'}); "
                        f"accepted: {accepted}")


# -- the Hugging Face Hub: decided before huggingface_hub is imported ---------------------------
# huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (timm and transformers import it).
# Offline without that variable, the first download retries for ~47 s before it fails. So a trainer
# that loads Hub weights calls `prepare_hf_hub` first: when no weights are needed, or the Hub
# cannot be reached, the Hub is switched to offline mode; weights already in the local cache
# (HF_HOME, e.g. baked into the image) still load in a fraction of a second, missing ones fail at
# once with `hf_pretrained_error`'s one line.

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_PROBE_TIMEOUT_S = 4.0


def probe_endpoint(url: str, timeout: float = ENDPOINT_PROBE_TIMEOUT_S) -> str | None:
    """None when `url` answers HTTP at all (proxies honoured), else what went wrong.

    Runs in a thread so a resolver that never answers costs `timeout` seconds, not minutes.
    """
    import requests

    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
            outcome.append(None)
        except requests.RequestException as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=attempt, name="endpoint-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else "no answer"


def prepare_hf_hub(need_weights: bool, environ: MutableMapping[str, str] | None = None,
                   ) -> str | None:
    """Set HF_HUB_OFFLINE when downloads are pointless or impossible; say why (None: online)."""
    environ = os.environ if environ is None else environ
    if "huggingface_hub" in sys.modules:
        log.debug("huggingface_hub already imported: HF_HUB_OFFLINE can no longer change")
    # The words huggingface_hub itself reads as true.
    if (outside_env("HF_HUB_OFFLINE", environ) or "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    if not need_weights:
        environ["HF_HUB_OFFLINE"] = "1"
        return "no pretrained weights are needed"
    endpoint = outside_env("HF_ENDPOINT", environ) or HF_DEFAULT_ENDPOINT
    problem = probe_endpoint(endpoint)
    if problem is None:
        return None
    environ["HF_HUB_OFFLINE"] = "1"
    log.warning("%s is unreachable (%s): pretrained weights only from the local cache",
                redact_url(endpoint), problem)
    return f"{redact_url(endpoint)} is unreachable"


def hf_pretrained_error(model_name: str, exc: BaseException, offline: str | None,
                        ) -> ConfigError:
    """The one line a failed pretrained-weights load becomes (`offline`: prepare_hf_hub's why)."""
    home = outside_env("HF_HOME") or "~/.cache/huggingface"
    if offline:
        return ConfigError(
            f"PRETRAINED=true but the pretrained weights of {model_name} are not in the local "
            f"cache ({home}) and {offline}: set PRETRAINED=false, or provide the weights in "
            "HF_HOME")
    return ConfigError(f"PRETRAINED=true but the pretrained weights of {model_name} could not "
                       f"be loaded ({type(exc).__name__}: {one_line(str(exc), 200)})")


# -- checkpoints: which may run code when loaded ------------------------------------------------
# A pickle runs code when it is loaded. A checkpoint is unpickled in full only when it is trusted:
# written by this platform's jobs (checkpoints/ of STORAGE_BUCKET), under a prefix the platform
# names in TRUSTED_CHECKPOINT_PREFIXES, or a local file a person points at. Anything else (an
# upload, another bucket) is loaded code-free (torch's weights-only unpickler) or refused.

PLATFORM_CHECKPOINTS = "checkpoints/"


def checkpoint_trust(storage: Storage, path: str, trusted_prefixes: str | None = None
                     ) -> str | None:
    """Why the checkpoint at `path` (CHECKPOINT_PATH) may run code when loaded, or None."""
    if not path.startswith(("s3://", "file://")) and Path(path).is_file():
        return "a local file"
    bucket, key = storage.split(path)
    if ".." in PurePosixPath(key).parts:
        return None
    prefixes = [PLATFORM_CHECKPOINTS] + [p.strip() for p in (trusted_prefixes or "").split(",")
                                         if p.strip()]
    for prefix in prefixes:
        prefix_bucket, prefix_key = storage.split(prefix)
        prefix_key = prefix_key.rstrip("/") + "/"  # a folder: uploads/ok never trusts uploads/okay
        if bucket == prefix_bucket and key.startswith(prefix_key):
            return f"under s3://{prefix_bucket}/{prefix_key}"
    return None


def untrusted_checkpoint_error(storage: Storage, path: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is not trusted to run code when loaded, and this trainer's "
        f"checkpoints hold pickled code: refused. Trusted are {PLATFORM_CHECKPOINTS} of bucket "
        f"{storage.bucket} (written by the platform's jobs), prefixes named in "
        "TRUSTED_CHECKPOINT_PREFIXES, and local files; copy it there or name its prefix")


def load_torch_checkpoint(path: Path, *, trusted: bool = False,
                          safe_globals: Sequence[Any] = ()) -> Any:
    """Unpickle a torch checkpoint by the trust rule; CheckpointError (one line) if it cannot be.

    Untrusted (the default): torch's weights-only unpickler, which builds tensors, containers and
    the classes in `safe_globals` and nothing else, so the file runs no code of its own. Trusted
    (`checkpoint_trust` said why): a full unpickle, for formats that pickle the model's classes.
    """
    import pickle

    import torch

    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not trusted and found:
            raise CheckpointError(f"{path.name} was refused: loading it would run code "
                                  f"({found.group(1)}), and it is loaded code-free here "
                                  "(weights only)") from None
        raise CheckpointError(f"{path.name} is not a readable checkpoint "
                              f"({type(exc).__name__})") from exc
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path.name} is not a readable checkpoint "
                              f"({type(exc).__name__})") from exc

# -- files written atomically: checkpoints, export archives, staged objects ------------------

@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest` in one step."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def link_or_copy(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Make `dest` hold `source`'s bytes, atomically: a hard link where the filesystem allows
    (no bytes written), else a copy.

    Only for a `source` that is replaced (`atomic_path`), never rewritten in place: a link
    shares the file, so an in-place rewrite would change `dest` too.
    """
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, tmp)
    return dest


def write_export_archive(dest: Path, files: Mapping[str, Path],
                         metadata: Mapping[str, Any]) -> Path:
    """Zip exported model files (or folders) and metadata.json into `dest`, atomically.

    The archive is read back before it replaces `dest`: a failure anywhere leaves no archive,
    never a half-written one.
    """
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("metadata.json",
                             json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
            for name, path in files.items():
                if not path.is_dir():
                    archive.write(path, name)  # a missing file raises: no partial archive
                    continue
                for member in sorted(path.rglob("*")):
                    if member.is_file():
                        archive.write(member, f"{name}/{member.relative_to(path).as_posix()}")
        with zipfile.ZipFile(tmp) as archive:
            broken = archive.testzip()
        if broken is not None:
            raise TrainerError(f"{dest.name}: {broken} did not read back intact")
    return dest


# =============================================================================================
# 6. Background delivery
# =============================================================================================


def _yield_cpu_to_training() -> None:
    """Run the calling thread (and the threads it starts) at the lowest CPU priority.

    Background delivery needs little CPU, but on a busy core every wake-up of an upload thread
    preempted the training thread and handed the GIL over: 3 x 10 MB of uploads slowed a
    training loop on the same core by ~70 % at normal priority, ~0 % at nice 19
    (tools/bench.py). Linux gives each thread its own nice value; elsewhere this does nothing.
    """
    if sys.platform.startswith("linux") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class OrderedWorker:
    """One daemon thread that handles items in submission order.

    `flush(timeout)` waits until everything submitted so far is handled or the timeout passes;
    the thread is a daemon, so a hung handler can never keep the process alive past its exit.
    """

    def __init__(self, name: str, handler: Callable[[Any], None]):
        self.name, self._handler = name, handler
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.closing = threading.Event()  # handlers stop retrying once this is set and due
        self.deadline: float | None = None

    def submit(self, item: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        _yield_cpu_to_training()
        while True:
            item = self._queue.get()
            try:
                self._handler(item)
            except Exception:  # a handler bug must not kill delivery of later items
                log.exception("%s: unexpected error", self.name)
            finally:
                self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float) -> bool:
        """True when everything submitted so far was handled within `timeout` seconds."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float) -> bool:
        self.deadline = time.monotonic() + timeout
        self.closing.set()
        return self.flush(timeout)

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def run_within(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """`call()`'s result if it returns within `timeout` seconds, else TimeoutError.

    A total deadline for a call that has only per-read timeouts (requests, botocore, MLflow's
    client): a server that trickles its answer, a byte a second, never trips those. The call
    runs on a daemon thread that is abandoned at the deadline (it cannot be interrupted; it
    ends when its socket does), so its caller can go on to the next event or exit.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the caller, re-raised there
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"within-{what}", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        raise TimeoutError(f"{what}: no complete answer within {timeout:.1f} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


_ANSWER_BODY_S = 1.0  # most seconds spent reading an answer's body once its status arrived
_ANSWER_MAX_BYTES = 2**20  # ... and most bytes kept of it (the body only carries `cancel`)


def request_within(session: Any, method: str, url: str, total_s: float, *,
                   timeout: tuple[float, float], **kwargs: Any) -> Any:
    """One HTTP request, connect to the body's last byte, within `total_s` seconds.

    Raises requests.Timeout when no status line came in time. A body still arriving after
    _ANSWER_BODY_S (or at the deadline) is cut: the answer comes back with what arrived and
    `body_late = True` -- the status says whether the event was accepted, the body is extra.
    """
    import requests

    deadline = time.monotonic() + total_s
    per_read = (min(timeout[0], total_s), max(min(timeout[1], total_s), 0.01))

    def call() -> Any:
        response = session.request(method, url, stream=True, timeout=per_read, **kwargs)
        body_deadline = min(deadline, time.monotonic() + _ANSWER_BODY_S)
        body, late = bytearray(), False
        try:
            while len(body) < _ANSWER_MAX_BYTES:
                if time.monotonic() >= body_deadline:
                    late = True
                    break
                chunk = response.raw.read1(65536, decode_content=True)
                if not chunk:
                    break
                body += chunk
        except Exception as exc:  # cut mid-body: what arrived is the answer
            log.debug("answer body cut: %s", exc)
            late = True
        finally:
            response.close()
        response._content, response._content_consumed = bytes(body), True
        response.body_late = late
        return response

    try:
        return run_within(call, total_s + 0.1, "request")
    except TimeoutError as exc:
        raise requests.Timeout(str(exc)) from None


def backoff_delays(base: float = 0.5, cap: float = 30.0) -> Iterator[float]:
    """Exponential backoff with full jitter, each delay at most `cap` seconds."""
    attempt = 0
    while True:
        yield random.uniform(base, min(cap, base * 2**attempt))
        attempt = min(attempt + 1, 32)  # 2**1000 would overflow a float: hours of a dead backend


class Uploader:
    """Uploads in the background from a snapshot, retrying a storage outage."""

    def __init__(self, storage: Storage, staging_dir: Path, retry_for_s: float = 300.0):
        self.storage, self.staging_dir, self.retry_for_s = storage, staging_dir, retry_for_s
        self.errors: list[TrainerError] = []
        self._worker = OrderedWorker("uploads", self._upload)
        self._count = 0

    def submit(self, local_path: Path | None, key: str, copies: Sequence[str] = (), *,
               metadata: Mapping[str, str] | None = None,
               convert: Callable[[Path, Path], None] | None = None,
               then: Callable[[], None] | None = None) -> str:
        """Snapshot `local_path` (a hard link, else a copy) and upload it in the background.

        `copies`: more keys for the same bytes, made by server-side copies once the upload is
        done, so a checkpoint that is `epoch-N` and `best` crosses the network once.
        `local_path=None`: no upload, only the copies of the existing object `key`.
        `convert(snapshot, dest)`: upload what it writes to `dest` instead of the snapshot (a
        checkpoint's weights-only form), made here, off the training loop.
        `then`: called once everything above has landed (e.g. retention deleting older
        objects); skipped when the upload failed.
        """
        snapshot = None
        if local_path is not None:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            self._count += 1
            snapshot = self.staging_dir / f"{self._count:06d}-{Path(key).name}"
            # Free, and safe: checkpoints are replaced (atomic_path), never rewritten in place.
            link_or_copy(local_path, snapshot)
        self._worker.submit((snapshot, key, tuple(copies), metadata, convert, then))
        return self.storage.uri(key)

    def _upload(self, item: tuple[Path | None, str, tuple[str, ...], Mapping[str, str] | None,
                                  Callable[[Path, Path], None] | None,
                                  Callable[[], None] | None]) -> None:
        snapshot, key, copies, metadata, convert, then = item
        started = time.monotonic()
        delays = backoff_delays(1.0, 15.0)
        pending: list[tuple[Callable[..., Any], Any, str]] = []
        if snapshot is not None and convert is not None:
            snapshot = self._converted(snapshot, key, convert)
            if snapshot is None:
                return
        if snapshot is not None:
            pending.append((functools.partial(self.storage.upload, metadata=metadata),
                            snapshot, key))
        pending += [(self.storage.copy, key, other) for other in copies]
        try:
            while pending:
                send, source, target = pending[0]
                try:
                    send(source, target)
                    pending.pop(0)
                except StorageError as exc:
                    retrying = time.monotonic() - started < self.retry_for_s
                    if not retrying or self._worker.time_left() < 0:
                        log.error("upload of %s failed: %s", target, exc)
                        self.errors.append(exc)
                        return
                    log.warning("upload of %s failed, retrying: %s", target, exc)
                    time.sleep(min(next(delays), max(self._worker.time_left(), 0)))
            if then is not None:
                then()
        finally:
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)

    def _converted(self, snapshot: Path, key: str,
                   convert: Callable[[Path, Path], None]) -> Path | None:
        """`convert`'s output for `snapshot` (which it replaces); None, recorded, if it fails."""
        converted = snapshot.with_name(snapshot.name + ".weights")
        try:
            convert(snapshot, converted)
        except Exception as exc:  # a converter's bug or an unreadable file: this upload is lost
            error = CheckpointError(f"could not make the weights-only form of {key}: "
                                    f"{type(exc).__name__}: {one_line(str(exc), 200)}")
            log.error("%s", error)
            self.errors.append(error)
            converted.unlink(missing_ok=True)
            return None
        finally:
            snapshot.unlink(missing_ok=True)
        return converted

    def flush(self, timeout: float) -> None:
        """Wait for every queued upload; raise the first failure (an upload is the job's output)."""
        if not self._worker.flush(timeout):
            raise StorageError(f"uploads still pending after {timeout:.0f} s")
        if self.errors:
            raise self.errors[0]

    def close(self, timeout: float) -> bool:
        return self._worker.close(timeout)


# =============================================================================================
# 7. Callbacks
# =============================================================================================

_RETRY_STATUS = {408, 429}
_DRAIN_RETRY_S = 1.0  # the longest wait between attempts once the job is exiting
JOURNAL_NAME = "callbacks.jsonl"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    with contextlib.suppress(TypeError, ValueError):
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
        return max((when - _dt.datetime.now(_dt.UTC)).total_seconds(), 0.0)
    return None


class CallbackClient:
    """Ordered, retried, non-blocking delivery of the job's events to the platform backend.

    Every event gets the next `seq`, is appended to `callbacks.jsonl` in the work dir, then is
    delivered by a background thread: timeouts, connection errors, 408, 429 (Retry-After) and
    5xx are retried with capped exponential backoff; other 4xx are not (one warning). After a
    401/403/404 the backend will not accept anything else, so delivery stops for the job.
    With no base URL, events are only journaled.
    """

    def __init__(self, base_url: str | None, token: str | None, job_id: str | None,
                 journal: Path, *, timeout: tuple[float, float] = (3.05, 10.0),
                 max_backoff: float = 30.0, on_cancel: Callable[[], None] | None = None,
                 ca_bundle: str | None = None, journal_optional: bool = False,
                 attempt_s: float = 15.0, script: str = "train"):
        self.base_url = base_url.rstrip("/") if base_url else None
        self.verify: str | bool = ca_bundle or True  # True: REQUESTS_CA_BUNDLE, else the system's
        # Only when reporting a job that could not start: its work dir may be unwritable, and
        # the event matters more than its journal line.
        self.journal_optional = journal_optional
        self._token, self.job_id, self.journal = token, job_id, journal
        self.timeout, self.max_backoff, self.on_cancel = timeout, max_backoff, on_cancel
        self.attempt_s = attempt_s  # one attempt's total, connect to the answer's last byte
        self._lock = threading.Lock()
        self._seq = self._last_journaled_seq()
        # Keys name the script and this attempt, so evaluate under the training job's id, or an
        # attempt whose journal was lost, never repeats a key; a re-send reuses the journaled key.
        self.script = script
        self.key_prefix = f"{job_id}:{script}:{secrets.token_hex(6)}"
        self._worker = OrderedWorker("callbacks", self._dispatch)
        self.validation_result_ids: dict[int, Any] = {}  # seq of a validation -> backend's id
        self._unlinked: set[int] = set()
        self._session = None
        self.disabled_reason: str | None = None
        self._warned: set[int] = set()
        self.delivered = 0
        self.abandoned = 0  # given up at the exit deadline: close() must not report success
        self._last_status: dict[str, Any] | None = None  # the latest PATCH /status event
        self._last_delivered_seq = 0  # delivery is in order: every seq up to it is done
        # Set each time a delivery attempt failed and the worker goes to wait before the next:
        # tests synchronise on it instead of sleeping.
        self.retry_waiting = threading.Event()

    def _last_journaled_seq(self) -> int:
        """Continue `seq` after a restart on the same work dir (idempotency keys stay unique).

        Only this job's events count: another job's journal in a shared WORK_DIR is not ours.
        """
        last = 0
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    if event["body"]["job_id"] == self.job_id:
                        last = max(last, int(event["seq"]))
        return last

    def send(self, method: str, route: str, body: dict[str, Any]) -> int:
        with self._lock:
            self._seq += 1
            event = {"method": method, "route": route, "key": f"{self.key_prefix}:{self._seq}",
                     "body": {**body, "job_id": self.job_id, "seq": self._seq}}
            try:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                with open(self.journal, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"seq": self._seq, "time": _utc_now(), **event},
                                        default=_json_default) + "\n")
            except OSError as exc:
                if not self.journal_optional:
                    raise
                log.warning("%s not written (%s); the event is sent all the same",
                            self.journal.name, exc.strerror or exc)
            if self.base_url and not self.disabled_reason:
                self._worker.submit(event)
                if route == "status":
                    self._last_status = event
            return self._seq

    def continue_journal(self) -> None:
        """Continue `seq` after the journal was restored from an earlier attempt's upload."""
        with self._lock:
            self._seq = max(self._seq, self._last_journaled_seq())

    def _url(self, route: str) -> str:
        return self.base_url + "/" + route.lstrip("/")  # join, never replace, the base path

    def _headers(self, key: str) -> dict[str, str]:
        return {"X-Internal-Auth": self._token or "", "Content-Type": "application/json",
                "Idempotency-Key": key}

    def resend_undelivered(self) -> int:
        """Queue again, under their own keys, the events an earlier attempt on this work dir
        journaled after the last one it saw delivered (the backend drops what it already has)."""
        delivered = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            delivered = int(self._delivered_mark.read_text(encoding="utf-8"))
        events = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    # Per-image results are not re-sent: the id they link to was the earlier
                    # attempt's answer, which this attempt never saw.
                    if event["body"]["job_id"] == self.job_id and event["seq"] > delivered and (
                            event["key"].split(":")[-3] == self.script) and (
                            event["route"] != "validation-image-results"):
                        events.append({k: event[k] for k in ("method", "route", "key", "body")})
        if self.base_url and not self.disabled_reason:
            for event in events:
                self._worker.submit(event)
        return len(events)

    @property
    def _delivered_mark(self) -> Path:
        return self.journal.with_suffix(".delivered")

    def _warn_once(self, status: int, message: str, *args: Any) -> None:
        if status not in self._warned:
            self._warned.add(status)
            log.warning(message, *args)

    def _deliver(self, event: dict[str, Any]) -> None:
        import requests

        if self._session is None:
            self._session = requests.Session()
        seq = event.get("seq") or event["body"]["seq"]  # a list body (follow-ups) has none
        key = event.get("key") or f"{self.job_id}:{seq}"
        payload = json.dumps(event["body"], default=_json_default)
        delays = backoff_delays(0.5, self.max_backoff)
        while not self.disabled_reason:
            wait: float | None = None
            try:
                response = request_within(
                    self._session, event["method"], self._url(event["route"]),
                    max(min(self.attempt_s, self._worker.time_left()), 0.1), data=payload,
                    headers=self._headers(key), timeout=self.timeout, allow_redirects=False,
                    verify=self.verify)
            except requests.exceptions.SSLError:
                self._refuse_certificate()
                return
            except requests.RequestException as exc:
                if isinstance(exc, requests.Timeout):
                    self._session = requests.Session()  # the abandoned attempt keeps the old
                self._warn_once(0, "backend unreachable (%s); retrying in the background",
                                type(exc).__name__)
            else:
                status = response.status_code
                if response.body_late:
                    self._warn_once(-1, "backend answered HTTP %s but trickled its body: cut "
                                    "after %.0f s (a cancel in it would be missed)", status,
                                    _ANSWER_BODY_S)
                if status < 300:
                    self.delivered += 1
                    self._last_delivered_seq = seq
                    with contextlib.suppress(OSError):  # what a resumed attempt need not resend
                        self._delivered_mark.write_text(str(seq), encoding="utf-8")
                    self._check_cancel(response)
                    self._remember_answer(event, response)
                    return
                if status == 422:
                    log.error("backend rejected %s %s as unreadable (HTTP 422): %s -- a bug on "
                              "the trainer's side; not retried", event["method"], event["route"],
                              response.text[:300])
                    return
                if 300 <= status < 400:  # never followed: the token stays with this origin
                    self._refuse_redirect(status, response.headers.get("Location"))
                    return
                if status in (401, 403, 404):
                    self.disabled_reason = f"HTTP {status}"
                    log.warning("backend answered HTTP %s to %s %s: callbacks are off for this "
                                "job; events stay in %s", status, event["method"],
                                event["route"], self.journal.name)
                    return
                if status not in _RETRY_STATUS and status < 500:
                    self._warn_once(status, "backend answered HTTP %s; not retried", status)
                    return
                wait = _retry_after(response.headers.get("Retry-After"))
                self._warn_once(status, "backend answered HTTP %s; retrying in the background",
                                status)
            self.retry_waiting.set()
            if wait is not None:  # the backend's Retry-After, honoured even at exit
                self._sleep_until_due(min(wait, self.max_backoff))
            elif not self._worker.closing.is_set():
                # The exit's drain wakes this sleep: a backoff grown during an outage must not
                # spend the flush budget after the backend is back.
                self._worker.closing.wait(next(delays))
            else:
                # Draining at exit the deadline bounds the retries, not the backoff: retry often
                # enough that a backend that is back gets the rest of the queue in the budget.
                self._sleep_until_due(min(next(delays), _DRAIN_RETRY_S))
            if self._worker.time_left() <= 0:
                self.abandoned += 1
                return

    def send_follow_up(self, route: str, records: Sequence[Mapping[str, Any]], *,
                       after_seq: int) -> int:
        """Queue a list body that needs the backend's answer to event `after_seq` (its
        `validation_result_id`, set into every record at delivery). The in-order queue delivers
        it after that event was answered; no id in the answer: it is not sent (one info line).
        """
        with self._lock:
            self._seq += 1
            body = [{**record, "job_id": self.job_id, "seq": self._seq} for record in records]
            event = {"method": "POST", "route": route, "seq": self._seq, "after_seq": after_seq,
                     "key": f"{self.key_prefix}:{self._seq}", "body": body}
            # The journal keeps a dict body (job_id, seq) like every other event's.
            journaled = {"job_id": self.job_id, "seq": self._seq, "after_seq": after_seq,
                         "results": body}
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"seq": self._seq, "time": _utc_now(), "method": "POST",
                                     "route": route, "key": event["key"], "body": journaled},
                                    default=_json_default) + "\n")
            if self.base_url and not self.disabled_reason:
                self._worker.submit(event)
            return self._seq

    def _dispatch(self, event: dict[str, Any]) -> None:
        after = event.get("after_seq")
        if after is not None:
            result_id = self.validation_result_ids.get(after)
            if result_id is None:
                if after not in self._unlinked:
                    self._unlinked.add(after)
                    log.info("the backend returned no validation_result_id for event %d: its "
                             "per-image results are not sent", after)
                return
            event = {**event, "body": [{**record, "validation_result_id": result_id}
                                       for record in event["body"]]}
        self._deliver(event)

    def _remember_answer(self, event: dict[str, Any], response: Any) -> None:
        if event["route"] != "validation-results":
            return
        with contextlib.suppress(ValueError):
            body = response.json()
            result_id = body.get("validation_result_id") if isinstance(body, dict) else None
            if isinstance(result_id, (int, str)) and not isinstance(result_id, bool):
                self.validation_result_ids[event["body"]["seq"]] = result_id

    def _refuse_redirect(self, status: int, location: str | None) -> None:
        """A redirect is a misconfigured backend (or a proxy in front of it): following it would
        hand X-Internal-Auth to another origin. Like a 401: delivery stops, the journal keeps
        every event, training goes on."""
        target = urlsplit(location or "")
        origin = f"{target.scheme}://{target.netloc}" if target.netloc else "the same origin"
        self.disabled_reason = f"HTTP {status} redirect"
        log.warning("backend answered HTTP %s redirecting to %s: a misconfigured backend "
                    "(callbacks never follow redirects); callbacks are off for this job; events "
                    "stay in %s", status, origin, self.journal.name)

    def _refuse_certificate(self) -> None:
        base = urlsplit(self.base_url or "")
        self.disabled_reason = "TLS certificate verification failed"
        log.warning("backend %s://%s: TLS certificate verification failed (a private CA: set "
                    "CA_BUNDLE or REQUESTS_CA_BUNDLE); callbacks are off for this job; events "
                    "stay in %s", base.scheme, base.netloc, self.journal.name)

    def _sleep_until_due(self, delay: float) -> None:
        time.sleep(max(min(delay, self._worker.time_left()), 0.0))

    def _check_cancel(self, response: Any) -> None:
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and body.get("cancel") is True and self.on_cancel:
                self.on_cancel()

    def pending(self) -> int:
        return self._worker.pending()

    def close(self, timeout: float) -> bool:
        """Deliver what is queued within `timeout` seconds; True when nothing was left behind."""
        if not self.base_url:
            return True
        # Part of the time is kept for a direct attempt at the terminal status: behind a hung or
        # dead backend the in-order queue never reaches it, and it is what the platform needs.
        reserve = min(max(timeout / 2, 1.0), 5.0) if self._last_status else 0.0
        done = self._worker.close(max(timeout - reserve, 0.0)) and not self.abandoned
        if not done:
            log.warning("backend: %d event(s) not delivered within %.0f s at exit (kept in %s)%s",
                        self._worker.pending() + self.abandoned, timeout, self.journal.name,
                        self._last_word(reserve))
        return done

    def _last_word(self, timeout: float) -> str:
        """Send the latest status once, ahead of the undelivered events; say how it went."""
        import requests

        event = self._last_status
        if event is None or self.disabled_reason or event["body"]["seq"] <= (
                self._last_delivered_seq) or timeout <= 0:
            return ""
        try:
            response = request_within(
                requests.Session(), event["method"], self._url(event["route"]), timeout,
                data=json.dumps(event["body"], default=_json_default),
                headers=self._headers(event["key"]), timeout=(min(self.timeout[0], timeout),
                                                              timeout),
                allow_redirects=False, verify=self.verify)
        except requests.RequestException as exc:
            return f"; the final status was attempted ahead of them ({type(exc).__name__})"
        return f"; the final status was sent ahead of them (HTTP {response.status_code})"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclasses.dataclass
class TrainingMetrics:
    """Body of POST /training-metrics (contract section 3), less the fields the job fills in."""

    loss: float | None = None
    accuracy: float | None = None
    learning_rate: float | None = None
    extra_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ValidationResult:
    """Body of POST /validation-results (contract section 3), less epoch and checkpoint."""

    task_type: str
    metrics: dict[str, float]
    primary_metric_name: str
    primary_metric_value: float
    overall_loss: float | None = None
    per_class_metrics: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    pr_curves: dict[str, Any] | None = None
    class_names: list[str] = dataclasses.field(default_factory=list)


# -- POST /logs: the job's own log lines, lowest priority ---------------------------------------

LOG_LINES_PER_S = 5.0  # sustained rate of log lines sent; a burst of LOG_BURST passes at once
LOG_BURST = 50
LOG_QUEUE_MAX = 200  # lines waiting for the backend; past it the oldest are dropped
_LOG_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR",
               "CRITICAL": "ERROR"}


class LogShipper(logging.Handler):
    """`POST /logs` (contract section 3): the job's own lines ("trainer" and its children).

    A lane of its own beside the event queue: its own bounded queue, thread and connection, so a
    log line never waits in front of an event and a hung log request never holds one up. It
    sends only while the event queue is empty, drops lines past a rate (a token bucket) or when
    the backend falls behind, and says how many in one line when it can send again. Lines are
    not journaled: callbacks.jsonl is the record of the platform's events, and the log lines are
    in the container's own log. Keys are `{job_id}:log:{run}:{n}`, `run` random per process, so
    they never meet an event's key nor another script's lines under the same JOB_ID.
    """

    def __init__(self, client: CallbackClient, secrets: Iterable[str],
                 epoch: Callable[[], int | None], *, rate: float = LOG_LINES_PER_S,
                 burst: int = LOG_BURST, queue_max: int = LOG_QUEUE_MAX):
        super().__init__(logging.INFO)
        self.client, self.epoch = client, epoch
        self.rate, self.burst = rate, burst
        self._redact = _RedactSecrets(secrets)
        self._lines: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_max = queue_max
        self._wake = threading.Condition()
        self._tokens, self._refilled = float(burst), time.monotonic()
        self._run_token = os.urandom(4).hex()
        self._count = 0
        self.dropped = 0  # since the last summary line
        self.sent = 0
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._deadline: float | None = None
        self._stopped: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is self._thread or self._stopped:
            return  # the lane's own words never feed the lane
        try:
            message = self._redact.redact(one_line(record.getMessage()))
        except Exception:  # a bad format string is the caller's bug, reported by the stream
            return
        with self._wake:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens < 1:
                self.dropped += 1
                return
            self._tokens -= 1
            self._summarise()
            self._put(message, _LOG_LEVELS.get(record.levelname, "INFO"))

    def _summarise(self) -> None:
        if self.dropped:
            count, self.dropped = self.dropped, 0
            self._put(f"{count} log line(s) not sent to the platform: more than {self.rate:g} "
                      "a second, or the backend behind", "WARNING")

    def _put(self, message: str, level: str) -> None:
        if len(self._lines) >= self._queue_max:
            self._lines.popleft()
            self.dropped += 1
        self._count += 1
        self._lines.append({"message": message, "level": level, "epoch": self.epoch(),
                            "timestamp": _utc_now(), "job_id": self.client.job_id,
                            "seq": self._count})
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="logs", daemon=True)
            self._thread.start()
        self._wake.notify()

    def _time_left(self) -> float:
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _run(self) -> None:
        import requests

        _yield_cpu_to_training()
        session = requests.Session()
        delays = backoff_delays(0.5, self.client.max_backoff)
        while not self._stopped:
            with self._wake:
                while not self._lines and not self._closing.is_set():
                    self._wake.wait()
                if not self._lines:
                    return
                line = self._lines[0]
            # Events go first, and logs go only to a backend that has accepted one: a backend
            # that redirects, refuses the token or fails TLS hears from the event lane alone.
            if self.client.pending() or self.client.disabled_reason or not self.client.delivered:
                self._pause(0.05)
                if self._time_left() <= 0:
                    return
                continue
            if self._post(session, line):
                delays = backoff_delays(0.5, self.client.max_backoff)
                with self._wake:
                    if self._lines and self._lines[0] is line:
                        self._lines.popleft()
            else:
                self._pause(next(delays))
            if self._time_left() <= 0:
                return

    def _pause(self, seconds: float) -> None:
        """Wait before the next try; close() cuts a long backoff short, then the deadline rules."""
        if not self._closing.is_set():
            self._closing.wait(seconds)
        else:
            time.sleep(max(min(seconds, _DRAIN_RETRY_S, self._time_left()), 0.0))

    def _post(self, session: Any, line: dict[str, Any]) -> bool:
        """One attempt; True when the line is done with (delivered, or never to be retried)."""
        import requests

        left = self._time_left()
        if left <= 0:
            return False
        timeout = (min(self.client.timeout[0], left), min(self.client.timeout[1], left))
        headers = {**self.client._headers(0),
                   "Idempotency-Key": f"{self.client.job_id}:log:{self._run_token}:{line['seq']}"}
        try:
            response = session.post(self.client._url("logs"), data=json.dumps(line),
                                    headers=headers, timeout=timeout, allow_redirects=False,
                                    verify=self.client.verify)
        except requests.exceptions.SSLError:
            self._stopped = "TLS"
            return True
        except requests.RequestException:
            return False
        status = response.status_code
        if status < 300:
            self.sent += 1
            return True
        if status in _RETRY_STATUS or status >= 500:
            return False
        if status in (401, 403, 404) or 300 <= status < 400:
            self._stopped = f"HTTP {status}"  # the event queue says why, once
        return True

    def drain(self, timeout: float) -> bool:
        """Send what is queued within `timeout` s (what the terminal status left); True if all.

        Not `close`: logging.shutdown() calls each handler's close() with no argument."""
        with self._wake:
            self._summarise()
            self._deadline = time.monotonic() + max(timeout, 0.0)
            self._closing.set()
            self._wake.notify()
        while self._lines and self._thread is not None and self._time_left() > 0 and (
                not self._stopped and self._thread.is_alive()):
            time.sleep(0.02)
        return not self._lines


# -- POST /validation-image-results: what a person looks at in the UI -----------------------------

IMAGE_RESULTS_PER_CALL = 100  # the contract's longest list per call
REVIEW_IOU = 0.5  # an image whose boxes match worse than this is a mistake worth a look


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def image_iou(true_boxes: Sequence[Mapping[str, Any]],
              predicted_boxes: Sequence[Mapping[str, Any]]) -> float:
    """One number per image: true and predicted boxes matched greedily within a class (most
    confident first), each match counts its IoU, each missed or extra box 0, averaged over the
    matches and the unmatched boxes on both sides; 1.0 for an image with none of either."""
    if not true_boxes and not predicted_boxes:
        return 1.0
    unmatched = list(range(len(true_boxes)))
    ious = []
    for pred in sorted(predicted_boxes, key=lambda p: -float(p.get("confidence") or 0)):
        best, best_i = 0.0, None
        for i in unmatched:
            if true_boxes[i]["class_id"] == pred["class_id"]:
                iou = box_iou(true_boxes[i]["bbox"], pred["bbox"])
                if iou > best:
                    best, best_i = iou, i
        if best_i is not None:
            unmatched.remove(best_i)
        ious.append(best)
    return round(sum(ious) / (len(ious) + len(unmatched)), 4)


def boxes_record(boxes: Iterable[Sequence[float]], class_names: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """(class_id, x1, y1, x2, y2[, confidence]) in pixels -> the contract's box dicts."""
    out = []
    for box in boxes:
        class_id = int(box[0])
        entry = {"class_id": class_id, "class_name": class_names[class_id]
                 if 0 <= class_id < len(class_names) else str(class_id),
                 "bbox": [round(float(v), 1) for v in box[1:5]]}
        if len(box) > 5:
            entry["confidence"] = round(float(box[5]), 4)
        out.append(entry)
    return out


def classification_image_record(index: int, image: Path, name: str, true_id: int,
                                top_ids: Sequence[int], top_confidences: Sequence[float],
                                class_names: Sequence[str]) -> dict[str, Any]:
    """One image's result (contract section 3), `top_ids` best first. `image` (the local file)
    and `name` (its path in the split) are for the upload; the job sets `image_path`."""
    top = [{"label": class_names[int(i)], "label_id": int(i), "confidence": round(float(c), 4)}
           for i, c in zip(top_ids[:5], top_confidences[:5], strict=False)]
    return {"image_file": image, "image_name": name, "image_index": index,
            "true_label": class_names[true_id], "true_label_id": int(true_id),
            "predicted_label": top[0]["label"], "predicted_label_id": top[0]["label_id"],
            "confidence": top[0]["confidence"], "top5_predictions": top,
            "is_correct": top[0]["label_id"] == int(true_id)}


def classification_image_records(items: Sequence[tuple[Path, int]],
                                 predictions: Sequence[tuple[Sequence[int], Sequence[float]]],
                                 class_names: Sequence[str],
                                 indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Records for a validated class-folder split: `items` its (image, class id) in order,
    `predictions` (top ids, their probabilities) per image validated, at `indices` of `items`
    (default: all, in order). Each image is named `<class folder>/<file>`, as in the dataset."""
    indices = range(len(predictions)) if indices is None else indices
    return [classification_image_record(i, items[i][0], f"{items[i][0].parent.name}/"
                                        f"{items[i][0].name}", items[i][1], ids, confidences,
                                        class_names)
            for i, (ids, confidences) in zip(indices, predictions, strict=False)]


def detection_image_record(index: int, image: Path, name: str,
                           true_boxes: Iterable[Sequence[float]],
                           predicted_boxes: Iterable[Sequence[float]],
                           class_names: Sequence[str]) -> dict[str, Any]:
    """One image's boxes (pixels) and its `image_iou`; see classification_image_record."""
    true, predicted = boxes_record(true_boxes, class_names), boxes_record(predicted_boxes,
                                                                           class_names)
    return {"image_file": image, "image_name": name, "image_index": index, "true_boxes": true,
            "predicted_boxes": predicted, "iou": image_iou(true, predicted)}


def select_image_results(records: Sequence[Mapping[str, Any]], limit: int
                         ) -> list[Mapping[str, Any]]:
    """The `limit` images a person learns most from: every mistake first (a wrong class, most
    confident first; boxes with IoU under REVIEW_IOU, worst first), then an even sample of the
    rest across the split, so the view also shows what the model gets right."""
    def iou(r: Mapping[str, Any]) -> float:  # segmentation keeps its boxes under extra_data
        return float(r.get("iou", (r.get("extra_data") or {}).get("iou")) or 0)

    def mistake(r: Mapping[str, Any]) -> bool:
        return r["is_correct"] is False if "is_correct" in r else iou(r) < REVIEW_IOU

    def badness(r: Mapping[str, Any]) -> float:
        return float(r["confidence"]) if "is_correct" in r else -iou(r)

    mistakes = sorted((r for r in records if mistake(r)), key=badness, reverse=True)
    chosen = mistakes[:limit]
    rest = [r for r in records if not mistake(r)]
    room = limit - len(chosen)
    if room >= len(rest):  # all of them fit (a step under 1 would repeat some, drop others)
        return chosen + rest
    if room > 0:
        step = len(rest) / room
        chosen += [rest[int(i * step)] for i in range(room)]
    return chosen


# =============================================================================================
# 8. MLflow
# =============================================================================================


def mlflow_metric_name(name: str) -> str:
    """MLflow accepts letters, digits, `_ - . / space`: `mAP@0.5:0.95` -> `mAP_0.5_0.95`."""
    return re.sub(r"[^\w\-./ ]", "_", name).strip("_") or "metric"


MLFLOW_CALL_S = 30.0  # most seconds one MLflow call may take before tracking is switched off


class NullTracker:
    """The tracker of a job that tracks nothing (not rank 0, predict/export, or MLflow off):
    every call is a no-op, so the job's code has no `if tracker` branches."""

    experiment_id: str | None = None
    run_id: str | None = None
    disabled_reason: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str, timeout: float) -> None:
        pass


def _served(tracking_uri: str) -> bool:
    """Whether a tracking server stores the artifacts (its own artifact store), rather than
    MLflow in this process (a sqlite/SQL database or a file store)."""
    return tracking_uri.startswith(("http://", "https://", "databricks"))


class Tracker:
    """One MLflow run per job. Best-effort: an unreachable server costs one warning.

    The store is never the current folder: without MLFLOW_TRACKING_URI it is WORK_DIR/mlflow.db,
    and an experiment this job creates keeps its artifacts under WORK_DIR/mlruns unless a
    tracking server stores them (MLflow's default, `./mlruns` of the current folder, would write
    into the code folder, read-only in an image).
    """

    def __init__(self, tracking_uri: str | None, experiment: str, work_dir: Path,
                 ca_bundle: str | None = None, *, call_s: float = MLFLOW_CALL_S):
        self.call_s = call_s  # one client call's total: MLflow's timeout is per socket read
        self.local = not tracking_uri
        self.ca_bundle = ca_bundle
        self.tracking_uri = tracking_uri or f"sqlite:///{work_dir / 'mlflow.db'}"
        self.artifact_location = (None if _served(self.tracking_uri)
                                  else (work_dir / "mlruns").as_uri())
        self.experiment, self.work_dir = experiment, work_dir
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.disabled_reason: str | None = None
        self._worker = OrderedWorker("mlflow", self._call)

    def _reachable(self) -> bool:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            request_within(requests.Session(), "GET", self.tracking_uri.rstrip("/") + "/health",
                           min(self.call_s, 5.0), timeout=(3, 3), verify=self.ca_bundle or True)
            return True
        except requests.exceptions.SSLError:
            self._disable(f"{redact_url(self.tracking_uri)}: TLS certificate verification failed "
                          "(a private CA: set CA_BUNDLE or REQUESTS_CA_BUNDLE)")
            return False
        except requests.RequestException as exc:
            self._disable(f"{redact_url(self.tracking_uri)} unreachable ({type(exc).__name__})")
            return False

    def _disable(self, reason: str) -> None:
        if not self.disabled_reason:
            self.disabled_reason = reason
            log.warning("MLflow tracking is off for this run: %s", reason)

    def start(self, run_name: str, tags: Mapping[str, str]) -> str | None:
        if not self._reachable():
            return None
        log.info("MLflow: starting run %s in experiment %s (%s)", run_name, self.experiment,
                 "local store in the work dir" if self.local else redact_url(self.tracking_uri))
        # Fail fast instead of MLflow's default minutes of retries against a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # MLflow writes the run's URL, tracking URI password included, straight to stdout.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.ca_bundle:  # MLflow's own variable for the server's CA
            os.environ.setdefault("MLFLOW_TRACKING_SERVER_CERT_PATH", self.ca_bundle)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = run_within(lambda: client.get_experiment_by_name(self.experiment),
                               self.call_s, "mlflow")
            self.experiment_id = found.experiment_id if found else run_within(
                lambda: client.create_experiment(self.experiment,
                                                 artifact_location=self.artifact_location),
                self.call_s, "mlflow")
            run = run_within(lambda: client.create_run(self.experiment_id, run_name=run_name,
                                                       tags=dict(tags)), self.call_s, "mlflow")
            self.client, self.run_id = client, run.info.run_id
        except Exception as exc:
            self._disable(f"{type(exc).__name__}: {redact_url(str(exc))[:200]}")
            return None
        return self.run_id

    def _call(self, item: tuple[str, tuple, dict]) -> None:
        if self.disabled_reason or self.client is None:
            return
        method, args, kwargs = item
        call, limit = getattr(self.client, method), self.call_s
        if method == "log_artifact":  # a file's upload: its total grows with its size
            with contextlib.suppress(OSError):
                limit += Path(args[0]).stat().st_size / STORAGE_MIN_RATE
        try:
            run_within(lambda: call(self.run_id, *args, **kwargs), limit, "mlflow")
        except Exception as exc:
            self._disable(f"{method} failed: {type(exc).__name__}: {redact_url(str(exc))[:200]}")

    def _submit(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.run_id and not self.disabled_reason:
            self._worker.submit((method, args, kwargs))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items() if v is not None]
        for start in range(0, len(items), 100):
            self._submit("log_batch", params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(mlflow_metric_name(k), float(v), now, step or 0)
                 for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
        if items:
            self._submit("log_batch", metrics=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit("log_artifact", str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._submit("set_tag", key, str(value))

    def end(self, status: str, timeout: float) -> None:
        self._submit("set_terminated", status)
        if not self._worker.close(timeout):
            log.warning("MLflow: calls still pending after %.0f s at exit", timeout)


# =============================================================================================
# 9. Job lifecycle
# =============================================================================================

_NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "mlflow", "alembic", "PIL",
                  "matplotlib", "httpx", "filelock", "git")
# urllib3 warns on every retried connection; the callback client and the tracker already say it
# once, in words (a dead MLflow server must cost one warning, not one per request).
_QUIET_LOGGERS = ("urllib3",)
FAILURE_NAME = "failure"  # the failed attempt's reason, one line, in the work dir
# A framework named otherwise than its package (provenance reads the package's version).
FRAMEWORK_PACKAGES = {"pytorch": "torch", "huggingface": "transformers"}


class _RedactSecrets(logging.Filter):
    """Last line of defence: no configured secret value ever reaches a log line."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            redacted = message
            for secret in self.secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


def configure_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Logs to stderr (results go to stdout), SDK loggers turned down. Entry points only."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_trainer", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._trainer = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
    handler.filters = [_RedactSecrets(secrets)]
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclasses.dataclass
class JobResult:
    """What a job's work function returns: final metrics and the best checkpoint's URI."""

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_path: str | None = None


class Job:
    """Everything a script needs while it runs: config, work dir, storage, reporting.

    Only the main process (global rank 0) talks to the backend, uploads and logs to MLflow;
    in other ranks those calls are no-ops, so the training code has no rank checks.
    """

    def __init__(self, kind: str, cfg: Config, *, framework: str, environ: Mapping[str, str]):
        self.kind, self.cfg, self.framework = kind, cfg, framework
        self.rank = int(environ.get("RANK", "0") or 0)
        self.local_rank = int(environ.get("LOCAL_RANK", "0") or 0)
        self.world_size = int(environ.get("WORLD_SIZE", "1") or 1)
        self.is_main = self.rank == 0
        self.id_generated = not cfg.job_id  # a local run: a job of its own, never a restart
        if self.id_generated and self.world_size > 1:
            raise ConfigError(f"JOB_ID is required under torchrun (WORLD_SIZE={self.world_size}):"
                              " every process must name the same job")
        self.job_id = cfg.job_id or local_job_id()
        self.work_dir = Path(cfg.work_dir or default_work_dir(self.job_id)).resolve()
        check_work_dir(self.work_dir)
        # One job per work dir, before anything reads or writes the journal (rank 0 holds it
        # for the job's processes: the other ranks of a distributed run share the dir).
        self._work_dir_lock = lock_work_dir(self.work_dir) if self.is_main else None
        if self.is_main:  # an earlier attempt's reason must not outlive this attempt's start
            (self.work_dir / FAILURE_NAME).unlink(missing_ok=True)
        self.cache_dir = Path(cfg.cache_dir).resolve() if cfg.cache_dir else self.work_dir / "cache"
        self.storage = Storage.from_config(cfg)
        self.cancel_requested = threading.Event()
        journal = self.work_dir / (JOURNAL_NAME if self.is_main
                                   else f"callbacks-rank{self.rank}.jsonl")
        # Read before this attempt writes. Only a restart of the same JOB_ID resumes: another
        # job's events in a shared WORK_DIR never count, and a generated id is always new.
        self.unfinished_attempt = not self.id_generated and _unfinished_attempt(journal,
                                                                                self.job_id)
        self.callbacks = CallbackClient(
            cfg.callback_url if self.is_main else None, cfg.internal_auth_token, self.job_id,
            journal, on_cancel=self.cancel_requested.set, ca_bundle=cfg.ca_bundle or None,
            script=kind)
        self.uploads = Uploader(self.storage, self.work_dir / ".upload-staging")
        self.tracker: Tracker | NullTracker = NullTracker()  # a real one from start(), if any
        self.dataset_etag: str | None = None  # the staged dataset's version (stage_dataset)
        self.last_checkpoint: Path | None = None
        self.last_uploaded_epoch: int | None = None
        self.best_checkpoint_uri: str | None = None
        self._newest_weights: tuple[int, Callable[[Path, Path], None], str | None] | None = None
        self.progress: float | None = None
        self._epoch_started = time.monotonic()
        self._epoch_times: list[float] = []
        self.dataset_etag: str | None = None  # of the staged dataset: provenance
        self.source_revision = outside_env("TRAINER_REVISION", environ)  # baked in by the image
        self.best_val: dict[str, float] = {}  # best_val_loss / best_val_accuracy so far
        self.current_epoch: int | None = None  # the epoch log lines belong to (POST /logs)
        self.last_validation: tuple[int, int] | None = None  # (seq, epoch) of the latest sent
        self.log_shipper: LogShipper | None = None

    # -- storage keys --------------------------------------------------------------------------
    def checkpoint_key(self, name: str) -> str:
        return f"checkpoints/job-{self.job_id}/{name}"

    def artifact_key(self, name: str) -> str:
        return f"artifacts/job-{self.job_id}/{name}"

    # -- inputs --------------------------------------------------------------------------------
    def stage_dataset(self, dataset_id: str | None = None) -> Path:
        """The dataset staged (`stage_dataset`); its version (archive ETag or folder manifest
        digest) is kept in `dataset_etag`, provenance of the run and its checkpoints."""
        root, self.dataset_etag = stage_dataset_version(
            self.storage, dataset_id or self.cfg.dataset_id, self.cache_dir,
            self.cfg.disk_budget_mb)
        self.tracker.set_tags({"dataset_etag": self.dataset_etag or ""})
        return root

    def provenance(self) -> dict[str, str | None]:
        """What made this run's results (contract section 4): on the MLflow run and in every
        checkpoint. `dataset_etag` is known once the dataset is staged."""
        package = FRAMEWORK_PACKAGES.get(self.framework, self.framework)
        return {"framework": self.framework, "framework_version": installed_version(package),
                "dataset_id": getattr(self.cfg, "dataset_id", None),
                "dataset_etag": self.dataset_etag,
                "image_ref": self.cfg.image_ref or None, "source_revision": self.source_revision}

    def read_platform_annotations(self, root: Path, task_type: str | None = None
                                  ) -> PlatformDataset:
        """The staged dataset's platform annotations with this job's VAL_FRACTION/SPLIT_SEED."""
        return read_platform_annotations(
            root, task_type or getattr(self.cfg, "task_type", None),
            val_fraction=getattr(self.cfg, "val_fraction", 0.2),
            split_seed=getattr(self.cfg, "split_seed", 42))

    def record_split(self, dataset: PlatformDataset) -> None:
        """The split in the run: MLflow params (its source, the counts) and an artifact listing
        the ids of each split's images."""
        if not self.is_main:
            return
        counts = dataset.split_counts()
        self.tracker.log_params({"split_source": dataset.split_source,
                                 **{f"split_{name}_images": n for name, n in counts.items()}})
        listing = self.work_dir / "split.json"
        listing.write_text(json.dumps({
            "annotation_file": dataset.annotation_file.name, "source": dataset.split_source,
            **{name: [image.id for image in dataset.split(name)] for name in counts}}))
        self.tracker.log_artifact(listing)

    def checkpoint_trust(self, path: str | None = None) -> str | None:
        """Why CHECKPOINT_PATH (or `path`) may run code when loaded, or None (see
        `checkpoint_trust`)."""
        path = path or self.cfg.checkpoint_path
        return checkpoint_trust(self.storage, path, self.cfg.trusted_checkpoint_prefixes
                                ) if path else None

    def require_trusted_checkpoint(self, path: str | None = None) -> None:
        """For a trainer whose checkpoints pickle code: refuse an untrusted one before any work."""
        path = path or self.cfg.checkpoint_path
        if path and self.checkpoint_trust(path) is None:
            raise untrusted_checkpoint_error(self.storage, path)

    def fetch_checkpoint(self, path: str | None = None, *, trusted_only: bool = False) -> Path:
        """A checkpoint by storage key / URI, or a local file a person points at.

        `trusted_only`: the caller will unpickle it in full, so an untrusted one is refused
        before it is downloaded.
        """
        path = path or self.cfg.checkpoint_path
        if not path:
            raise ConfigError("missing required settings: CHECKPOINT_PATH")
        if trusted_only:
            self.require_trusted_checkpoint(path)
        if not path.startswith(("s3://", "file://")) and Path(path).is_file():
            return Path(path).resolve()
        bucket, key = self.storage.split(path)
        dest = self.work_dir / "inputs" / "checkpoints" / Path(key).name
        return self.storage.download(path, dest)

    def stage_inputs(self, input_path: str | None = None) -> list[Path]:
        return stage_inputs(self.storage, input_path or self.cfg.input_path,
                            self.work_dir / "inputs" / "images")

    # -- outputs -------------------------------------------------------------------------------
    def upload(self, local_path: str | os.PathLike | None, key: str, *, background: bool = False,
               copies: Sequence[str] = (), metadata: Mapping[str, str] | None = None,
               convert: Callable[[Path, Path], None] | None = None,
               then: Callable[[], None] | None = None) -> str:
        """Upload to `key` (and server-side copies to `copies`); in the background or now.

        `local_path=None` uploads nothing: `copies` are then made from the existing `key`.
        `convert` (background only) and `then`: see `Uploader.submit`.
        """
        if not self.is_main:
            return self.storage.uri(key)
        if background:
            return self.uploads.submit(None if local_path is None else Path(local_path), key,
                                       copies, metadata=metadata, convert=convert, then=then)
        if convert is not None:
            raise ValueError("convert= needs background=True")
        uri = self.storage.uri(key)
        if local_path is not None:
            uri = self.storage.upload(local_path, key, metadata=metadata)
        for other in copies:
            self.storage.copy(key, other)
        if then is not None:
            then()
        return uri

    def upload_artifacts(self, paths: Iterable[str | os.PathLike], subdir: str = "") -> list[str]:
        """Upload files to artifacts/job-{id}/{subdir}/ and log them to MLflow.

        In the background, like checkpoints, so a storage outage at the end of a job is retried
        rather than fatal; the job is not `completed` until they are all in the bucket.
        """
        uris = []
        for path in paths:
            path = Path(path)
            if not path.is_file():
                continue
            name = f"{subdir.strip('/')}/{path.name}" if subdir else path.name
            uris.append(self.upload(path, self.artifact_key(name), background=True))
            self.tracker.log_artifact(path, subdir or None)
        return uris

    # -- reporting -----------------------------------------------------------------------------
    def notify_status(self, status: str, error: str | None = None, **fields: Any) -> None:
        body = {"status": status, "error": error, "progress": self.progress,
                "updated_at": _utc_now(), "mlflow_experiment_id": self.tracker.experiment_id,
                "mlflow_run_id": self.tracker.run_id, **fields}
        self.callbacks.send("PATCH", "status", body)

    def send_training_metrics(self, epoch: int, metrics: TrainingMetrics,
                              checkpoint_path: str | None = None) -> None:
        body = {"epoch": epoch, "step": epoch, **dataclasses.asdict(metrics),
                "checkpoint_path": checkpoint_path}
        self.callbacks.send("POST", "training-metrics", body)

    def send_validation_result(self, epoch: int, result: ValidationResult, *,
                               is_best: bool = False, checkpoint_path: str | None = None,
                               split: str | None = None) -> int:
        body = {"epoch": epoch, **dataclasses.asdict(result), "is_best": is_best,
                "checkpoint_path": checkpoint_path,
                "source": "evaluate" if self.kind == "evaluate" else "train",
                "split": split or getattr(self.cfg, "split", None) or "val"}
        seq = self.callbacks.send("POST", "validation-results", body)
        self.last_validation = (seq, epoch)
        return seq

    def send_validation_image_results(self, records: Sequence[Mapping[str, Any]], *,
                                      split: str = "val") -> int:
        """Per-image results of the latest validation sent (`POST /validation-image-results`).

        `records`: one per validated image (`classification_image_record`,
        `detection_image_record`, or a dict with the contract's fields plus `image_file`, the
        local image, and for segmentation `true_mask_file` / `predicted_mask_file`, local mask
        images uploaded under validation-masks/ for the records chosen). At most
        VAL_IMAGE_RESULTS_MAX are chosen (`select_image_results`), their images uploaded in the
        background under artifacts/job-{id}/validation-images/{split}/ (a folder dataset's
        images are referenced by their own keys instead), and sent in lists of
        IMAGE_RESULTS_PER_CALL once the backend has answered the validation with its
        `validation_result_id`. Returns how many were queued.
        """
        limit = getattr(self.cfg, "val_image_results_max", 200)  # a script without the setting
        if not self.is_main or not limit or not records or self.last_validation is None:
            return 0
        after_seq, epoch = self.last_validation
        chosen = []
        for record in select_image_results(records, limit):
            record = dict(record)
            image = Path(record.pop("image_file"))
            own = folder_object_key(image)  # a folder dataset's image is already in the bucket
            if own is not None:
                image_path = self.storage.uri(own)
            else:  # an archive's member: uploaded once, where the UI can fetch it
                key = self.artifact_key(f"validation-images/{split}/{record['image_name']}")
                image_path = self.upload(image, key, background=True)
            for field, folder in (("true_mask", "true"), ("predicted_mask", "predicted")):
                mask = record.pop(f"{field}_file", None)  # segmentation: a local mask image
                if mask is not None:
                    name = PurePosixPath(record["image_name"]).with_suffix(".png").as_posix()
                    record[f"{field}_path"] = self.upload(
                        Path(mask), self.artifact_key(f"validation-masks/{split}/{folder}/{name}"),
                        background=True)
            chosen.append({"epoch": epoch, **record, "image_path": image_path})
        for start in range(0, len(chosen), IMAGE_RESULTS_PER_CALL):
            self.callbacks.send_follow_up("validation-image-results",
                                          chosen[start:start + IMAGE_RESULTS_PER_CALL],
                                          after_seq=after_seq)
        log.info("%d per-image validation result(s) queued (of %d images)", len(chosen),
                 len(records))
        return len(chosen)

    def ship_logs(self) -> LogShipper | None:
        """Send the job's own log lines to `POST /logs` (main process, with a backend only)."""
        if not self.is_main or not self.callbacks.base_url:
            return None
        self.log_shipper = LogShipper(self.callbacks, self.cfg.secret_values(),
                                      lambda: self.current_epoch)
        logging.getLogger("trainer").addHandler(self.log_shipper)
        return self.log_shipper

    def stop_shipping_logs(self, timeout: float) -> None:
        """Detach the log lane after giving it what is left of the exit's budget."""
        shipper, self.log_shipper = self.log_shipper, None
        if shipper is not None:
            logging.getLogger("trainer").removeHandler(shipper)
            shipper.drain(timeout)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)

    def start_epoch(self, epoch: int | None = None) -> None:
        self._epoch_started = time.monotonic()
        if epoch is not None:
            self.current_epoch = epoch

    def end_epoch(self, epoch: int, total_epochs: int, training: TrainingMetrics,
                  validation: ValidationResult | None = None, *, checkpoint: Path | None = None,
                  is_best: bool = False, epoch_time_s: float | None = None,
                  weights: Callable[[Path, Path], None] | None = None) -> None:
        """Everything the platform wants after an epoch, in one call (rank 0 only).

        Publishes the checkpoints (`publish_checkpoint`: `last.pt` every epoch, weights-only
        `epoch-{N}.pt` and `best.pt`) in the background from snapshots, sends training metrics
        and the validation result, logs MLflow metrics at step = epoch, and honours a cancel
        request. `checkpoint` (resumable) must be written atomically (see `atomic_path`);
        `weights(source, dest)` writes its weights-only form (see `publish_checkpoint`).
        """
        self.check_finite(epoch, training, validation, checkpoint=checkpoint)
        self.current_epoch = epoch
        elapsed = (time.monotonic() - self._epoch_started) if epoch_time_s is None else epoch_time_s
        self._epoch_times.append(elapsed)
        mean = sum(self._epoch_times[-5:]) / len(self._epoch_times[-5:])
        extra = {"epoch_time_s": round(elapsed, 3),
                 "eta_s": round(mean * (total_epochs - epoch), 1),
                 "total_epochs": total_epochs, **training.extra_metrics}
        training = dataclasses.replace(training, extra_metrics=extra)
        self.progress = round(100.0 * epoch / total_epochs, 2)
        if not self.is_main:
            self.start_epoch()
            return
        epoch_uri = None
        if checkpoint is not None:
            epoch_uri = self.publish_checkpoint(epoch, total_epochs, checkpoint, weights=weights,
                                                is_best=is_best)
        self.send_training_metrics(epoch, training, epoch_uri)
        # One naming, the seed-era UI's: `train_loss`, `val_loss`, `val_mAP_0.5` (contract 4).
        flat = {f"train_{k}": v for k, v in dataclasses.asdict(training).items()
                if k != "extra_metrics"}
        flat.update({f"train_{k}": v for k, v in extra.items() if k != "total_epochs"})
        if validation is not None:
            best_uri = self.best_checkpoint_uri if is_best else None
            self.send_validation_result(epoch, validation, is_best=is_best,
                                        checkpoint_path=best_uri)
            flat.update({f"val_{k}": v for k, v in validation.metrics.items()})
            if validation.overall_loss is not None:
                flat["val_loss"] = validation.overall_loss
            self._note_best(validation)
        self.log_metrics(flat, step=epoch)
        if self.cancel_requested.is_set():
            raise JobCancelled(f"cancelled by the platform after epoch {epoch}")
        self.start_epoch()

    def check_finite(self, epoch: int, training: TrainingMetrics | None = None,
                     validation: ValidationResult | None = None, *,
                     checkpoint: Path | None = None) -> None:
        """Divergence is a failure: a loss that stopped being finite ends the job `failed`.

        `end_epoch` calls it first; a trainer whose framework could hide the epoch (Ultralytics
        reloads last.pt on a NaN loss and retries) calls it itself as soon as the loss is known.
        A NaN step makes the epoch's mean loss NaN, so the check sees every such step, at the
        end of its epoch. `checkpoint` (else the last one handed to end_epoch) is uploaded as
        last.pt, for inspection, before TrainingDiverged (exit EXIT_DIVERGED) is raised.
        """
        losses = (("training loss", training.loss if training else None),
                  ("validation loss", validation.overall_loss if validation else None))
        bad = [(what, value) for what, value in losses
               if value is not None and not math.isfinite(value)]
        if not bad:
            return
        what, value = bad[0]
        checkpoint = checkpoint or self.last_checkpoint
        if self.is_main and checkpoint is not None and checkpoint.is_file():
            self.upload(checkpoint, self.checkpoint_key("last.pt"), background=True)
            try:
                self.uploads.flush(timeout=DIVERGED_UPLOAD_S)
            except StorageError as exc:
                log.warning("could not upload last.pt of the diverged run: %s", exc)
        raise TrainingDiverged(f"training diverged: the {what} is {value} at epoch {epoch} "
                               "(try a lower LEARNING_RATE); last.pt was kept for inspection")

    def release_work_dir(self) -> None:
        """Give the work dir's lock back (the kernel does it anyway when the process ends)."""
        if self._work_dir_lock is not None:
            os.close(self._work_dir_lock)
            self._work_dir_lock = None

    # -- checkpoints ---------------------------------------------------------------------------
    def publish_checkpoint(self, epoch: int, total_epochs: int, checkpoint: Path, *,
                           weights: Callable[[Path, Path], None] | None = None,
                           is_best: bool = False) -> str | None:
        """The one checkpoint-publishing rule (storage layout: docs/checkpoints.md).

        `checkpoint` (resumable: optimizer, schedule, ...) goes to `last.pt` every epoch.
        `weights(source, dest)`, the trainer's converter, writes the weights-only form of the
        checkpoint file `source` to `dest`; the upload worker runs it on the snapshot, off the
        training loop, only when the form is needed: for `epoch-{N}.pt` every CHECKPOINT_EVERY
        epochs and at the final epoch (unless KEEP_EPOCH_CHECKPOINTS=0), and for `best.pt` when
        `is_best` (a server-side copy of `epoch-{N}.pt` when the epoch is both). A trainer
        without a weights-only form passes `weights=None`: its checkpoint then serves every key,
        as one upload and server-side copies. Key order: `epoch-{N}.pt` (and `best.pt`) before
        `last.pt`, so whenever `last.pt` changes, its epoch's weights are already in the bucket
        under their own name.
        Returns the URI of `epoch-{N}.pt` when one is published.
        """
        if not self.is_main:
            return None
        self.last_checkpoint = checkpoint
        keep = getattr(self.cfg, "keep_epoch_checkpoints", None)
        every = getattr(self.cfg, "checkpoint_every", 1) or 1
        epoch_due = keep != 0 and (epoch % every == 0 or epoch == total_epochs)
        epoch_key = self.checkpoint_key(f"epoch-{epoch}.pt")
        last_key, best_key = self.checkpoint_key("last.pt"), self.checkpoint_key("best.pt")
        tag = {"epoch": str(epoch), "checkpoint": "resumable"}
        weights_tag = {"epoch": str(epoch), "checkpoint": "weights"}
        prune = (lambda: self._prune_epoch_checkpoints(keep)) if keep else None
        if is_best:
            self.best_checkpoint_uri = self.storage.uri(best_key)
        if weights is None:
            # One upload; the other keys are server-side copies of it (same bytes, no traffic).
            keys = ([epoch_key] if epoch_due else []) + [last_key] + ([best_key] if is_best else [])
            self.upload(checkpoint, keys[0], background=True, copies=keys[1:], metadata=tag,
                        then=prune if epoch_due else None)
        else:
            if epoch_due:
                self.upload(checkpoint, epoch_key, background=True,
                            copies=[best_key] if is_best else [], metadata=weights_tag,
                            convert=weights, then=prune)
            elif is_best:
                self.upload(checkpoint, best_key, background=True, metadata=weights_tag,
                            convert=weights)
            self.upload(checkpoint, last_key, background=True, metadata=tag)
            self._newest_weights = (epoch, weights, epoch_key if epoch_due else None)
        self.last_uploaded_epoch = epoch
        return self.storage.uri(epoch_key) if epoch_due else None

    def publish_finished_model(self) -> None:
        """A completed job is never resumed: its `last.pt` becomes the last epoch's weights-only
        form (a server-side copy of that epoch's `epoch-{N}.pt` where there is one)."""
        if not self.is_main or self._newest_weights is None:
            return
        self.uploads.flush(timeout=3600)  # a lost epoch-N.pt fails the job here, not the copy
        epoch, weights, epoch_key = self._newest_weights
        last_key = self.checkpoint_key("last.pt")
        if epoch_key is not None:
            self.upload(None, epoch_key, background=True, copies=[last_key])
        elif self.last_checkpoint is not None and self.last_checkpoint.is_file():
            self.upload(self.last_checkpoint, last_key, background=True, convert=weights,
                        metadata={"epoch": str(epoch), "checkpoint": "weights"})
        log.info("job completed: %s now holds epoch %d's weights only", self.storage.uri(last_key),
                 epoch)

    def _prune_epoch_checkpoints(self, keep: int) -> None:
        """KEEP_EPOCH_CHECKPOINTS: delete all but the newest `keep` epoch-N.pt (run by the upload
        worker once the newest has landed). A failure leaves extra objects, never fewer."""
        prefix = self.checkpoint_key("")
        try:
            numbered = sorted((int(m.group(1)), key) for key in self.storage.list(prefix)
                              if (m := re.fullmatch(re.escape(prefix) + r"epoch-(\d+)\.pt", key)))
            for _, key in numbered[:-keep]:
                self.storage.delete(key)
                log.info("deleted %s (KEEP_EPOCH_CHECKPOINTS=%d)", self.storage.uri(key), keep)
        except StorageError as exc:
            log.warning("could not prune older epoch checkpoints: %s", exc)

    def owns_checkpoint_path(self) -> bool:
        """Whether CHECKPOINT_PATH is one of this job's own checkpoints (the job goes on)."""
        path = getattr(self.cfg, "checkpoint_path", None)
        if not path or (not path.startswith(("s3://", "file://")) and Path(path).is_file()):
            return False
        bucket, key = self.storage.split(path)
        return bucket == self.storage.bucket and key.startswith(self.checkpoint_key(""))

    def refuse_weights_only_resume(self, weights_only: bool) -> None:
        """A weights-only checkpoint (epoch-N.pt, best.pt, a finished job's last.pt) fine-tunes a
        new job; as this job's own CHECKPOINT_PATH it would be a resume, which it cannot be."""
        if not weights_only or not self.owns_checkpoint_path():
            return
        path, last = self.cfg.checkpoint_path, self.checkpoint_key("last.pt")
        if self.storage.split(path)[1] == last:
            raise CheckpointError(f"CHECKPOINT_PATH={path}: job {self.job_id} is finished (its "
                                  "last.pt holds weights only); fine-tune it from a new job")
        raise CheckpointError(f"CHECKPOINT_PATH={path} holds weights only (no optimizer "
                              f"state) and cannot resume job {self.job_id}: resume from {last}")

    def _note_best(self, validation: ValidationResult) -> None:
        """`best_val_loss` / `best_val_accuracy`, logged at the end (the seed-era UI reads them)."""
        for name, value, better in (("best_val_loss", validation.overall_loss, min),
                                    ("best_val_accuracy", validation.metrics.get("accuracy"), max)):
            if isinstance(value, (int, float)) and value == value:
                self.best_val[name] = better(self.best_val.get(name, value), value)

    # -- start and end -------------------------------------------------------------------------
    def start(self, run_name: str | None = None) -> None:
        if self.kind == "train":
            self._continue_earlier_attempt()
        if self.is_main and self.kind in ("train", "evaluate"):
            experiment = self.cfg.mlflow_experiment_name.replace("{JOB_ID}", self.job_id)
            tracker = Tracker(self.cfg.mlflow_tracking_uri, experiment, self.work_dir,
                              ca_bundle=self.cfg.ca_bundle or None)
            prefix = "job" if self.kind == "train" else "eval"
            tags = {"job_id": self.job_id, "dataset_id": str(self.cfg.get("DATASET_ID") or ""),
                    "framework": self.framework, "model_name": str(
                        getattr(self.cfg, "model_name", "") or ""), "job_kind": self.kind,
                    **{k: v for k, v in self.provenance().items() if v and k not in (
                        "framework", "dataset_id")}}
            if tracker.start(run_name or f"{prefix}-{self.job_id}", tags):
                self.tracker = tracker
                self.tracker.log_params({k: v for k, v in self.cfg.redacted().items()
                                         if not self.cfg._settings[k].secret}
                                        | option_params(self.cfg))
        self.notify_status("running")

    def _continue_earlier_attempt(self) -> None:
        """A restarted job carries on where its earlier attempt stopped.

        On the same work dir after an attempt that did not complete (SIGKILL, OOM, a lost node:
        the container restarts with the same env), training resumes from the job's own uploaded
        last.pt, whatever CHECKPOINT_PATH says. On a new work dir with CHECKPOINT_PATH at the
        job's own last.pt, the earlier attempt's uploaded callbacks.jsonl is fetched first, so
        `seq` (and the Idempotency-Key) continue instead of repeating keys the backend has seen.
        """
        own = self.checkpoint_key("last.pt")
        if self.unfinished_attempt:
            self.callbacks.resend_undelivered()
            try:
                self.storage.head(own)
            except StorageError:
                return  # nothing uploaded yet (or storage is down: staging the dataset says so)
            log.info("resuming from %s: an earlier attempt of this job did not finish",
                     self.storage.uri(own))
            self.cfg = dataclasses.replace(self.cfg, checkpoint_path=own)
            return
        path = self.cfg.checkpoint_path
        journal = self.callbacks.journal
        if not path or self.id_generated or journal.exists() or not self.is_main or (
                self.storage.split(path) != (self.storage.bucket, own)):
            return
        try:
            self.storage.download(self.artifact_key(JOURNAL_NAME), journal)
        except StorageError as exc:
            log.info("no journal of the earlier attempt (%s); seq starts at 1", exc)
            return
        self.callbacks.continue_journal()

    def _upload_last_on_cancel(self, deadline: float) -> None:
        if not self.is_main or self.last_checkpoint is None or not self.last_checkpoint.exists():
            return
        try:
            self.uploads.flush(max(deadline - time.monotonic(), 0))
        except StorageError as exc:
            log.warning("could not upload last.pt while cancelling: %s", exc)

    def _upload_journal(self, deadline: float) -> None:
        """callbacks.jsonl goes with the artifacts, so nothing is lost if the backend never heard.

        Best-effort and bounded: a dead storage endpoint must not hold the exit past `deadline`.
        """
        journal = self.callbacks.journal
        if not self.is_main or not journal.is_file():
            return

        def upload() -> None:
            try:
                self.storage.upload(journal, self.artifact_key(JOURNAL_NAME))
            except StorageError as exc:
                log.warning("could not upload %s: %s", JOURNAL_NAME, exc)

        thread = threading.Thread(target=upload, name="journal-upload", daemon=True)
        thread.start()
        thread.join(max(min(deadline - time.monotonic(), 10.0), 0.1))

    def finish(self, outcome: str, result: JobResult | None, error: str | None,
               deadline: float) -> None:
        """Report the terminal status; bounded by `deadline` (a monotonic time)."""
        if outcome == "cancelled":
            self._upload_last_on_cancel(deadline - 3)
        fields: dict[str, Any] = {}
        if result is not None:
            fields = {"metrics": result.metrics, "checkpoint_path": result.checkpoint_path}
            self.progress = 100.0
        mlflow_status = {"completed": "FINISHED", "cancelled": "KILLED"}.get(outcome, "FAILED")
        self.tracker.log_metrics(self.best_val)
        self.tracker.end(mlflow_status, max(min(deadline - time.monotonic(), 10.0), 0.1))
        self.notify_status(outcome, error, **fields)
        self._upload_journal(deadline)
        self.callbacks.close(max(deadline - time.monotonic(), 0.1))
        self.stop_shipping_logs(deadline - time.monotonic())  # logs: what the events left
        self.uploads.close(0.1)


DIVERGED_UPLOAD_S = 120.0  # most seconds spent uploading a diverged run's last.pt
WORK_DIR_MIN_FREE_MB = 16  # the journal, the failure record and a few checkpoints' metadata
WORK_DIR_LOCK = ".job.lock"


def check_work_dir(work_dir: Path) -> None:
    """WORK_DIR exists (created if need be), is writable and has room for the journal.

    Checked before anything else, so an unusable work dir is one line and a `failed` status
    (sent without a journal), not a traceback at the first journal write.
    """
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
        free_mb = shutil.disk_usage(work_dir).free // 2**20
    except OSError as exc:
        raise WorkDirError(f"WORK_DIR={work_dir} is unusable: {exc.strerror or exc}"
                           f"{f' ({exc.filename})' if exc.filename else ''}") from None
    if free_mb < WORK_DIR_MIN_FREE_MB:
        raise WorkDirError(f"WORK_DIR={work_dir} has {free_mb} MiB free, under the "
                           f"{WORK_DIR_MIN_FREE_MB} MiB a job needs for its journal")


def lock_work_dir(work_dir: Path) -> int:
    """Take the work dir for this process: an exclusive `flock` on WORK_DIR/.job.lock.

    The kernel releases it when the process ends, however it ends (SIGKILL and OOM included),
    so a restart is never blocked by a dead attempt; a second live process with the same work
    dir (a platform retry racing the original) gets WorkDirBusy naming the holder's pid. The
    returned descriptor stays open for the life of the process.
    """
    import fcntl

    path = work_dir / WORK_DIR_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WorkDirError(f"WORK_DIR={work_dir} is unusable: cannot open {path.name}: "
                           f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise WorkDirBusy(f"WORK_DIR={work_dir} is in use by another process (pid {holder}): "
                          "one job per work dir; this one sent nothing") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unfinished_attempt(journal: Path, job_id: str) -> bool:
    """Whether this work dir holds the journal of an attempt of `job_id` that did not complete."""
    statuses = []
    with contextlib.suppress(FileNotFoundError):
        for line in journal.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                event = json.loads(line)
                if event["route"] == "status" and event["body"]["job_id"] == job_id:
                    statuses.append(event["body"]["status"])
    return bool(statuses) and statuses[-1] != "completed"


def local_job_id(now: _dt.datetime | None = None) -> str:
    """The id of a run started without JOB_ID: `local-YYYYmmdd-HHMMSS-xxxx` (UTC, 4 random hex).

    Every such run is a job of its own, with its own work dir, storage keys and MLflow run, so
    two local runs never resume, report over or overwrite each other.
    """
    now = now or _dt.datetime.now(_dt.UTC)
    return f"local-{now:%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"


def default_work_dir(job_id: str) -> Path:
    return Path(tempfile.gettempdir()) / "vision-platform" / f"job-{job_id}"


_active_job: Job | None = None


def _job() -> Job:
    if _active_job is None:
        raise RuntimeError("no job is running: call this from the work function given to run_job")
    return _active_job


def _record_failure(work_dir: Path | None, line: str, termination_log: str | None) -> None:
    if work_dir is not None:
        with contextlib.suppress(OSError):
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / FAILURE_NAME).write_text(line + "\n", encoding="utf-8")
    if termination_log and os.path.isfile(termination_log) and os.access(termination_log, os.W_OK):
        with contextlib.suppress(OSError), open(termination_log, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _report_config_error(exc: ConfigError, environ: Mapping[str, str]) -> None:
    """Settings did not parse: still tell the backend, with whatever raw values are usable."""
    job_id = environ.get("JOB_ID") or local_job_id()
    if not IDENTIFIER.fullmatch(job_id):  # a bad JOB_ID must not name a path, even here
        job_id = local_job_id()
    work_dir = environ.get("WORK_DIR") or str(default_work_dir(job_id))
    line = one_line(str(exc))
    _record_failure(Path(work_dir), line, environ.get("TERMINATION_LOG", "/dev/termination-log"))
    try:
        token = secret_from_env("INTERNAL_AUTH_TOKEN", environ)
    except ConfigError:  # a token file that cannot be read (already in the error line)
        token = None
    callback_url = environ.get("CALLBACK_URL")
    try:
        check_url("CALLBACK_URL", callback_url or "http://unset", HTTP_SCHEMES)
    except ConfigError:  # no call could reach it: do not spend the flush budget retrying
        callback_url = None
    client = CallbackClient(callback_url, token, job_id, Path(work_dir) / JOURNAL_NAME,
                            timeout=(3.05, 5.0), ca_bundle=environ.get("CA_BUNDLE") or None,
                            journal_optional=True)
    client.send("PATCH", "status", {"status": "failed", "error": line, "progress": None,
                                    "updated_at": _utc_now(), "mlflow_experiment_id": None,
                                    "mlflow_run_id": None})
    client.close(10.0)


def print_capabilities(work: Callable[..., Any], framework: str) -> int:
    """`--capabilities`: the manifest of the trainer whose script defines `work`, on stdout."""
    trainer_dir = Path(sys.modules[work.__module__].__file__).resolve().parent
    try:
        manifest = describe_trainer(trainer_dir, framework)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return EXIT_OK


def run_job(kind: str, settings: Sequence[Setting], work: Callable[[Job], JobResult | None], *,
            framework: str, argv: Sequence[str] | None = None, description: str | None = None,
            prog: str | None = None, environ: Mapping[str, str] | None = None,
            options: FrameworkOptions | None = None) -> int:
    """Run one job: parse settings -> `running` -> work(job) -> `completed`, or fail cleanly.

    Returns the exit code (see EXIT_CODES); `main` does `sys.exit(run_job(...))`. With
    `--capabilities` it prints the trainer's manifest instead, reading no setting.
    """
    global _active_job
    if "--capabilities" in (sys.argv[1:] if argv is None else argv):
        return print_capabilities(work, framework)
    environ = os.environ if environ is None else environ
    settings = merge_settings(PLATFORM_SETTINGS, settings)
    configure_logging(environ.get("LOG_LEVEL", "INFO").upper()
                      if environ.get("LOG_LEVEL", "INFO").upper() in logging._nameToLevel
                      else "INFO")
    try:
        cfg = parse_settings(settings, argv, environ, prog=prog, description=description)
        cfg = apply_options(cfg, options)  # PRESET + EXTRA_ARGS, checked before any work
    except ConfigError as exc:
        log.error("%s", one_line(str(exc)))
        _report_config_error(exc, environ)
        return exc.exit_code
    configure_logging(cfg.log_level, cfg.secret_values())
    try:
        job = Job(kind, cfg, framework=framework, environ=environ)
    except WorkDirBusy as exc:  # the holder is this job's live attempt: its keys are its own
        log.error("%s", one_line(str(exc)))
        _record_failure(None, one_line(str(exc)), cfg.termination_log)
        return exc.exit_code
    except (OSError, WorkDirError) as exc:  # e.g. a WORK_DIR that cannot be created or written
        error = exc if isinstance(exc, WorkDirError) else ConfigError(
            f"cannot set up the job: {exc.strerror or exc}: {exc.filename or cfg.work_dir}")
        log.error("%s", one_line(str(error)))
        _report_config_error(error, environ)
        return error.exit_code
    except ConfigError as exc:  # e.g. torchrun without JOB_ID
        log.error("%s", one_line(str(exc)))
        _report_config_error(exc, environ)
        return exc.exit_code
    _active_job = job
    job.ship_logs()
    log.info("%s job %s (%s%s), work dir %s", kind, job.job_id, framework,
             "; no JOB_ID: a new local job" if job.id_generated else "", job.work_dir)
    log.debug("settings: %s", cfg.redacted())

    def on_sigterm(signum: int, frame: Any) -> None:
        if job.cancel_requested.is_set() and getattr(job, "_terminating", False):
            return
        job._terminating = True  # type: ignore[attr-defined]
        job.cancel_requested.set()
        # Past the grace period the process goes, whatever it is doing.
        timer = threading.Timer(cfg.shutdown_grace_s, lambda: os._exit(EXIT_SIGTERM))
        timer.daemon = True
        timer.start()
        raise JobCancelled("received SIGTERM", exit_code=EXIT_SIGTERM)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    outcome, result, error, code = "failed", None, None, EXIT_UNEXPECTED
    try:
        job.start()
        result = work(job) or JobResult()
        if job.is_main:
            job.publish_finished_model()
            job.uploads.flush(timeout=3600)
        outcome, code = "completed", EXIT_OK
    except JobCancelled as exc:
        outcome, error, code = "cancelled", one_line(str(exc)), exc.exit_code
        log.warning("%s", error)
    except TrainerError as exc:
        error, code = one_line(str(exc)), exc.exit_code
        log.error("%s", error)
    except KeyboardInterrupt:
        outcome, error, code = "cancelled", "interrupted", EXIT_SIGTERM
    except Exception as exc:  # a bug: keep the traceback, report one line
        error = one_line(f"unexpected error: {type(exc).__name__}: {exc}")
        log.exception("unexpected error")
    finally:
        grace = cfg.shutdown_grace_s if outcome == "cancelled" else cfg.callback_flush_s
        deadline = time.monotonic() + max(grace - 2, 1)
        try:
            job.finish(outcome, result if outcome == "completed" else None, error, deadline)
        except JobCancelled:  # a second SIGTERM while finishing: the timer will end us
            pass
        if error and outcome == "failed":
            _record_failure(job.work_dir, error, cfg.termination_log)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        job.release_work_dir()
        job.stop_shipping_logs(0)  # finish gave it its time; a finish that raised did not
        _active_job = None
        log.info("%s job %s %s in %.1f s (exit %d)", kind, job.job_id, outcome,
                 time.monotonic() - started, code)
    return code


def exit_process(code: int) -> None:
    """End the process now with `code`: the scripts' last line, `utils.exit_process(main())`.

    When `run_job` returns, everything is reported and uploaded. What is left is the
    interpreter's teardown of torch, MLflow and their threads, which takes seconds (13 s seen on
    a busy 2-core runner) that nobody waits for, that SHUTDOWN_GRACE_S cannot spare after a
    SIGTERM (the grace timer cannot fire during teardown), and that would unbound the exit
    after a hung backend. So: flush the logs and streams, then leave without the teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# =============================================================================================
# 10. Results: the metrics and export envelope every trainer shares
# =============================================================================================
# The platform compares these across trainers, so they are contract, not framework code: a
# trainer computes its confusion matrix, exports and verifies its model (its own code), then
# hands the rest to these functions.


def classification_metrics(confusion: Any, class_names: Sequence[str], top5_correct: int,
                           ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """(metrics, per_class_metrics) under the platform's names, from a confusion matrix.

    `confusion`: counts, rows = true class, columns = predicted class, in class-id order;
    `top5_correct`: how many images had their class among the five highest scores. Precision,
    recall and F1 are macro averages over the classes present in the split (support > 0); a class
    never predicted has precision 0. numpy only, which every trainer has.
    """
    import numpy as np

    counts = np.asarray(confusion, dtype=np.float64)
    total = counts.sum()
    true_pos = np.diag(counts)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    present = support > 0
    metrics = {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "top5_accuracy": float(top5_correct / total) if total else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1_score": float(f1[present].mean()) if present.any() else 0.0,
    }
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "f1_score": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return metrics, per_class


# -- exported models: metadata.json (schemas/export-metadata.schema.json), archive, upload ------

EXPORT_METADATA_VERSION = 1


def json_digest(value: Any) -> str:
    """Hex SHA-256 of a JSON value (keys sorted): a stable key for a cache entry."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_metadata(job: Job, fmt: ExportFormat, capabilities: Capabilities, *, source: Path,
                    task_type: str, class_names: Sequence[str], input_name: str,
                    input_shape: Sequence[int], outputs: Sequence[Mapping[str, Any]],
                    preprocessing: Mapping[str, Any], checkpoint: Mapping[str, Any],
                    exporter: Mapping[str, Any], verification: Mapping[str, Any],
                    framework: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """metadata.json: everything a deployment needs besides the model file itself.

    The trainer says what only it knows: the task, class names, input shape (batch -1: any),
    outputs (dtype is added), preprocessing, what the source checkpoint is (`checkpoint`: format,
    model_name, epoch, ...; its path and sha256 are added), what exported and verified the model,
    and `framework` fields beyond name, package and version. The envelope is the contract's.
    """
    cfg = job.cfg
    dtype = "float16" if cfg.half else "float32"
    return {
        "metadata_version": EXPORT_METADATA_VERSION,
        "format": fmt.name,
        "file": fmt.file,
        "task_type": task_type,
        "class_names": list(class_names),
        "input": {"name": input_name, "shape": list(input_shape), "dtype": dtype,
                  "layout": "NCHW"},
        "outputs": [{**output, "dtype": dtype} for output in outputs],
        "preprocessing": dict(preprocessing),
        "source_checkpoint": {"path": cfg.checkpoint_path, "sha256": file_sha256(source),
                              **checkpoint},
        "trainer": job.framework,
        "framework": {"name": capabilities.framework, "package": capabilities.package,
                      "version": installed_version(capabilities.package), **(framework or {})},
        "exporter": dict(exporter),
        "verification": dict(verification),
        "dynamic_batch": cfg.dynamic_batch,
        "half": cfg.half,
        "job_id": job.job_id,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def write_export(job: Job, fmt: ExportFormat, model_file: Path,
                 metadata: Mapping[str, Any]) -> Path:
    """The archive `export-{EXPORT_FORMAT}.zip` (model + metadata.json) in the work dir."""
    return write_export_archive(job.work_dir / "export" / f"export-{fmt.name}.zip",
                                {fmt.file: model_file}, metadata)


def publish_export(job: Job, fmt: ExportFormat, archive: Path,
                   verification: Mapping[str, Any]) -> JobResult:
    """Upload the archive to artifacts/job-{JOB_ID}/export/, print its URI (stdout: the
    result), and the job's result: the verification's largest difference when it ran."""
    uri = job.upload(archive, job.artifact_key(f"export/{archive.name}"))
    log.info("exported %s to %s (%.1f MB)", fmt.name, uri, archive.stat().st_size / 2**20)
    print(uri, flush=True)
    checked = verification["status"] == "passed"
    return JobResult(metrics={"max_abs_diff": verification["max_abs_diff"]} if checked else {})


# =============================================================================================
# 11. The seed's names, bound to the running job
# =============================================================================================


def download_dataset(dataset_id: str | None = None) -> Path:
    """Stage `datasets/{dataset_id}.zip` (cached by ETag) and return the dataset's root folder."""
    return _job().stage_dataset(dataset_id)


def download_checkpoint(checkpoint_path: str | None = None) -> Path:
    """Download a checkpoint (storage key, s3:// URI or local file) and return its local path."""
    return _job().fetch_checkpoint(checkpoint_path)


def upload_checkpoint(local_path: str | os.PathLike, remote_path: str) -> str:
    """Upload a checkpoint to a storage key; return its `s3://bucket/key` URI."""
    return _job().upload(local_path, remote_path)


def upload_artifact(local_path: str | os.PathLike, remote_path: str) -> str:
    """Upload an artifact to a storage key; return its URI."""
    return _job().upload(local_path, remote_path)


def notify_status(status: str, error: str | None = None, **fields: Any) -> None:
    _job().notify_status(status, error, **fields)


def send_training_metrics(epoch: int, loss: float | None = None, accuracy: float | None = None,
                          learning_rate: float | None = None, checkpoint_path: str | None = None,
                          extra_metrics: dict[str, Any] | None = None) -> None:
    _job().send_training_metrics(
        epoch, TrainingMetrics(loss, accuracy, learning_rate, extra_metrics or {}), checkpoint_path)


def send_validation_result(epoch: int, result: ValidationResult, *, is_best: bool = False,
                           checkpoint_path: str | None = None) -> None:
    _job().send_validation_result(epoch, result, is_best=is_best, checkpoint_path=checkpoint_path)


def start_experiment(experiment_name: str | None = None, run_name: str | None = None,
                     tags: Mapping[str, str] | None = None) -> str | None:
    """Start (or return) the job's MLflow run; `run_job` already did for train/evaluate."""
    job = _job()
    if isinstance(job.tracker, NullTracker) and job.is_main:
        tracker = Tracker(job.cfg.mlflow_tracking_uri,
                          experiment_name or job.cfg.mlflow_experiment_name, job.work_dir)
        if tracker.start(run_name or f"job-{job.job_id}", dict(tags or {})):
            job.tracker = tracker
    return job.tracker.run_id


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    _job().log_metrics(metrics, step)


def log_params(params: Mapping[str, Any]) -> None:
    job = _job()
    secret = {n for n, s in job.cfg._settings.items() if s.secret}
    job.tracker.log_params({k: v for k, v in params.items() if k not in secret})


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    _job().tracker.log_artifact(path, artifact_path)
