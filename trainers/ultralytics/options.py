"""The job's settings as Ultralytics train arguments, and EXTRA_ARGS checked against its own.

EXTRA_ARGS passes Ultralytics options through (`{"mosaic": 0.5, "cos_lr": true}`). Every key is
checked before any work: unknown names (with Ultralytics' closest match), values of the wrong
type, and keys the platform owns (a setting of their own, or the job's outputs) are all reported
at once as one ConfigError.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import utils

# Ultralytics arguments the job sets itself: EXTRA_ARGS may not, and the error says what to use.
OWNED = {
    "model": "MODEL_NAME", "data": "DATASET_ID", "task": "TASK_TYPE", "mode": "train.py",
    "epochs": "EPOCHS", "batch": "BATCH_SIZE", "imgsz": "IMAGE_SIZE", "lr0": "LEARNING_RATE",
    "optimizer": "OPTIMIZER", "device": "DEVICE", "workers": "NUM_WORKERS", "seed": "SEED",
    "pretrained": "PRETRAINED", "amp": "AMP", "resume": "CHECKPOINT_PATH",
    "save_period": "CHECKPOINT_EVERY", "project": "WORK_DIR", "name": "WORK_DIR",
    "exist_ok": "WORK_DIR", "save_dir": "WORK_DIR", "cfg": "EXTRA_ARGS itself",
    "save": "the platform (checkpoints are always saved)",
    "val": "the platform (it reads a validation every epoch)",
}


def check_extra_args(extra: dict[str, Any] | None) -> dict[str, Any]:
    """EXTRA_ARGS, validated by Ultralytics' own option names and types; ConfigError if not."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    extra = dict(extra or {})
    problems = []
    owned = sorted(k for k in extra if k in OWNED)
    if owned:
        problems.append("keys the job sets itself: " + ", ".join(
            f"{k!r} (use {OWNED[k]})" for k in owned))
    unknown = sorted(k for k in extra if k not in DEFAULT_CFG_DICT and k not in OWNED)
    if unknown:
        problems.append("unknown Ultralytics train arguments: " + ", ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                k, DEFAULT_CFG_DICT, n=1)) else "") for k in unknown))
    for key in sorted(set(extra) - set(owned) - set(unknown)):
        checked = {key: extra[key]}
        try:
            check_cfg(checked)  # converts in place where Ultralytics would (e.g. 1 -> 1.0)
        except (TypeError, ValueError) as exc:
            problems.append(utils.one_line(str(exc)))
        else:
            extra[key] = checked[key]
    if problems:
        raise utils.ConfigError("EXTRA_ARGS: " + "; ".join(problems))
    return extra


def train_arguments(cfg: Any, *, data: str, device: str | None, save_dir: Path,
                    extra: dict[str, Any], world_size: int = 1) -> dict[str, Any]:
    """Keyword arguments of `YOLO.train` for a new run (fresh or fine-tuning)."""
    on_gpu = device != "cpu" and (device is not None or gpu_available())
    return {
        # BATCH_SIZE is per process; Ultralytics' `batch` is split across the DDP ranks.
        "data": data, "epochs": cfg.epochs, "batch": cfg.batch_size * max(world_size, 1),
        "imgsz": cfg.image_size, "lr0": cfg.learning_rate, "optimizer": cfg.optimizer,
        "device": device, "workers": cfg.num_workers, "seed": cfg.seed,
        "amp": bool(cfg.amp) and on_gpu, "save_dir": str(save_dir), "exist_ok": True,
        "save_period": -1, "save": True, "val": True, "plots": True, **extra,
    }


def resume_arguments(cfg: Any, *, data: str, device: str | None,
                     save_dir: Path) -> dict[str, Any]:
    """Keyword arguments of `YOLO.train(resume=True)`: the interrupted run's hyperparameters
    stand; only what belongs to this machine and this job changes."""
    return {"resume": True, "data": data, "device": device, "workers": cfg.num_workers,
            "save_dir": str(save_dir)}


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()
