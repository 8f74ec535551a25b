"""Ultralytics made private to the job, quiet and offline, before it is first imported.

Ultralytics reads its environment once, at import: where its config and settings live
(`YOLO_CONFIG_DIR`), whether it may probe the network (`YOLO_OFFLINE`: its DNS check, analytics,
pip auto-updates), whether it may pip-install a package it misses (`YOLO_AUTOINSTALL`, e.g. an
export toolchain) and how many OpenMP threads to use (it pins `OMP_NUM_THREADS=1` when unset).
Its settings file then switches its integrations on by default: MLflow autolog (a second run
per job, written to ./mlruns), the Ultralytics Platform/HUB, TensorBoard, Comet, ClearML, DVC,
Ray Tune and W&B, each whenever its package imports.

`prepare` puts the config dir inside the job's work dir, with a font already in place (plots
would download Arial.ttf otherwise), turns every integration and the settings sync off, points
Ultralytics' default folders at the work dir and sends its log lines to stderr. The job reports
through utils.py only: one MLflow run, the platform's callbacks, nothing written into the current
directory and no network attempt of Ultralytics' own.

Its chatter stays out of the job's log unless LOG_LEVEL=DEBUG (`FrameworkNoise`): the notes
about the settings file it creates, the dump of every training argument, the model's
layer-by-layer table, the `yolo predict ...` hints after an export (they name a temporary file
that is gone by then); and its ANSI colours whenever stderr is not a terminal. Its progress,
summaries, warnings and errors stay.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import utils

log = logging.getLogger(f"trainer.{__name__}")

INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # the names Ultralytics' plots ask for
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOISE = re.compile(
    r"\s*(Creating new Ultralytics Settings|View Ultralytics Settings|Update Settings with"
    r"|engine/trainer: "  # every training argument in one line of 1,500+ characters
    r"|Export complete"  # `yolo predict model=<a temp file export.py has since removed>` hints
    r"|from\s+n\s+params\s+module"  # the header of the model's layer table ...
    r"|\d+\s+(-1|\[[-\d, ]+\])\s+\d+\s+\d+\s+\S+)")  # ... and its rows


class FrameworkNoise(logging.Filter):
    """Drops Ultralytics' chatter (unless `verbose`) and its colours (unless `colour`)."""

    def __init__(self, *, verbose: bool, colour: bool):
        super().__init__()
        self.verbose, self.colour = verbose, colour

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        plain = _ANSI.sub("", message)
        if not self.verbose and record.levelno < logging.WARNING and _NOISE.match(plain):
            return False
        if not self.colour and plain != message:
            record.msg, record.args = plain, ()
        return True


def quiet_framework_logs(*, verbose: bool) -> None:
    """Install `FrameworkNoise` on Ultralytics' logger; before the import, which already talks."""
    logger = logging.getLogger("ultralytics")
    for old in [f for f in logger.filters if isinstance(f, FrameworkNoise)]:
        logger.removeFilter(old)
    logger.addFilter(FrameworkNoise(verbose=verbose, colour=sys.stderr.isatty()))


def config_dir(work_dir: Path, rank: int = 0) -> Path:
    """One per process: torchrun's ranks would otherwise rewrite one settings.json at once."""
    return work_dir / ("ultralytics-config" if rank == 0 else f"ultralytics-config-rank{rank}")


def install_fonts(user_dir: Path) -> None:
    """Matplotlib's DejaVuSans under the names Ultralytics looks up, so it never downloads one."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONT_NAMES:
        target = user_dir / name
        if not target.exists():
            with utils.atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)


def prepare(work_dir: Path, weights_dir: Path, *, cpu_threads: int | None = None,
            offline: bool = False, rank: int = 0) -> None:
    """Set Ultralytics' environment and settings for this job; call before importing it."""
    private = config_dir(work_dir, rank)
    if "ultralytics" in sys.modules and utils.outside_env("YOLO_CONFIG_DIR") != str(private):
        raise RuntimeError("ultralytics was imported before runtime.prepare(): its config dir, "
                           "offline mode and integrations can no longer be set")
    user_dir = private / "Ultralytics"
    user_dir.mkdir(parents=True, exist_ok=True)
    install_fonts(user_dir)
    quiet_framework_logs(verbose=log.isEnabledFor(logging.DEBUG))
    os.environ["YOLO_CONFIG_DIR"] = str(private)
    os.environ["YOLO_OFFLINE"] = "1"  # no DNS probe, analytics or pip updates; downloads are ours
    os.environ["YOLO_AUTOINSTALL"] = "false"  # a missing package fails the job, never pip-installs
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # would stream the run to the Ultralytics Platform
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if cpu_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads))

    import ultralytics.utils as ultralytics_utils

    folders = {"datasets_dir": work_dir / "datasets", "weights_dir": weights_dir,
               "runs_dir": work_dir / "runs"}
    ultralytics_utils.SETTINGS.update({"sync": False, "api_key": "",
                                       **dict.fromkeys(INTEGRATIONS, False),
                                       **{key: str(path) for key, path in folders.items()}})
    # The same folders as module constants, which Ultralytics computed from its settings at
    # import (the GPU AMP check downloads its model into WEIGHTS_DIR).
    ultralytics_utils.DATASETS_DIR = folders["datasets_dir"]
    ultralytics_utils.WEIGHTS_DIR = folders["weights_dir"]
    ultralytics_utils.RUNS_DIR = folders["runs_dir"]
    if offline:
        skip_amp_check_download(weights_dir)
    for handler in logging.getLogger("ultralytics").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)  # stdout carries the job's results only
    if not sys.stderr.isatty():
        plain_progress_bars()


def plain_progress_bars() -> None:
    """Ultralytics' progress bars, fit for a log file: one line per bar (no cursor codes, which
    it would send to any stream) and no colours in their labels (`train: Scanning ...`)."""
    import ultralytics.utils.tqdm as progress

    progress.is_noninteractive_console = lambda: True
    display = progress.TQDM._display
    if getattr(display, "_plain", False):
        return

    def plain_display(self, final: bool = False) -> None:
        self.desc = _ANSI.sub("", self.desc)
        display(self, final)

    plain_display._plain = True  # type: ignore[attr-defined]
    progress.TQDM._display = plain_display


def cpu_threads(device: str) -> int | None:
    """OpenMP threads for a CPU run: every core this process may use (Ultralytics would use 1)."""
    if device.strip().lower() != "cpu":
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def skip_amp_check_download(weights_dir: Path) -> None:
    """Offline, skip the GPU AMP self-test when its model (yolo26n.pt) is not at hand.

    Ultralytics checks AMP on a GPU by running yolo26n.pt, downloading it first; when that
    download fails it skips the check and keeps AMP on. OFFLINE=true means no attempt at all, so
    the check is skipped up front, with the same outcome.
    """
    if (weights_dir / "yolo26n.pt").is_file():
        return
    import ultralytics.engine.trainer as engine

    def check_amp_offline(model) -> bool:
        log.warning("AMP self-test skipped (OFFLINE=true and no yolo26n.pt in %s); "
                          "AMP stays on", weights_dir)
        return True

    engine.check_amp = check_amp_offline
