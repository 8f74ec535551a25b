"""The checkpoint format: self-describing, plain types only, every task the same.

A checkpoint holds the model's state dict and its transformers configuration as plain JSON types
(`config.to_json_string()`), so `Task.model_from_config` rebuilds the architecture with no
download and no pickled class; plus the class names, image size, normalisation, task type and the
run's provenance. Plain types also mean every checkpoint, trusted or not, loads with torch's
weights-only unpickler (the contract's trust rule, `utils.load_torch_checkpoint`).

Two forms (docs/checkpoints.md): the resumable `last.pt` (optimizer, schedule, loss scale, epoch,
best value) and the weights-only form of `epoch-N.pt`, `best.pt` and a finished job's `last.pt`
(`weights_only`), which the contract's upload worker makes from a snapshot of `last.pt`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch

import utils

CHECKPOINT_FORMAT = "vision-platform/huggingface/2"
READABLE_FORMATS = (CHECKPOINT_FORMAT,)
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "best_value")  # not in weights-only files


def plain_config(model: Any) -> dict[str, Any]:
    """The model's full configuration as JSON types (defaults included: a later transformers
    with other defaults still rebuilds the same architecture)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically: a reader (or a background upload) never sees a half-written file."""
    import transformers

    with utils.atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT,
                    "created_at": dt.datetime.now(dt.UTC).isoformat(),
                    "versions": {"transformers": transformers.__version__,
                                 "torch": str(torch.__version__)},
                    **state}, tmp)


def weights_only(source: Path, dest: Path) -> None:
    """The weights-only form of `source` at `dest`: everything but the training state a resume
    needs. Memory-mapped: only the tensors kept are read (this runs beside training)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, dest)


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    return checkpoint.get("optimizer") is None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Weights and plain containers only: loads without running code, trusted or not.
    checkpoint = utils.load_torch_checkpoint(path)
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found not in READABLE_FORMATS:
        raise utils.CheckpointError(f"{path.name} is not a {CHECKPOINT_FORMAT} checkpoint "
                                    f"(format: {found or 'unknown, another framework'})")
    return checkpoint


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a state dict, as a CheckpointError (one line) when it does not fit the model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1:2] or [str(exc)]
        raise utils.CheckpointError("checkpoint weights do not fit the model: "
                                    f"{utils.one_line(first[0], 300)}") from None


def model_from_checkpoint(task: Any, checkpoint: dict[str, Any],
                          device: torch.device) -> torch.nn.Module:
    """The checkpoint's model in eval mode, built by its task from the stored configuration."""
    model = task.model_from_config(checkpoint["model_config"])
    load_weights(model, checkpoint["model"])
    return model.to(device).eval()


def task_of(checkpoint: dict[str, Any], task_type: str | None) -> Any:
    """The checkpoint's task; a TASK_TYPE given that names another is a configuration error."""
    from task import task_for

    stored = checkpoint["task_type"]
    if task_type and task_type != stored:
        raise utils.ConfigError(f"TASK_TYPE={task_type} but the checkpoint holds a {stored} "
                                "model")
    return task_for(stored)
