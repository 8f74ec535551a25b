"""timm models: name and EXTRA_ARGS checks, creation, and the self-describing checkpoint.

A checkpoint holds everything evaluate.py and predict.py need to rebuild the model and its
preprocessing (architecture, keyword arguments, class names, resolved data config), and
everything train.py needs to resume (optimizer, scheduler, EMA, AMP scaler, epoch, update count).
That resumable form is `last.pt`; `epoch-N.pt`, `best.pt` and a finished job's `last.pt` are the
weights-only form (`save_weights`): the inference weights (the EMA's when the run keeps one) and
the same description, no training state (docs/checkpoints.md), which the contract's upload worker
makes from a snapshot of `last.pt`, off the training loop.
"""

from __future__ import annotations

import datetime as dt
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import hub
import utils

log = logging.getLogger(f"trainer.{__name__}")

CHECKPOINT_FORMAT = "vision-platform/timm/2"
# Format 1 (every file resumable, before weights-only checkpoints) reads the same way.
READABLE_FORMATS = (CHECKPOINT_FORMAT, "vision-platform/timm/1")
TRAINING_STATE = ("model", "ema", "optimizer", "scheduler", "scaler", "best_value")

# create_model keywords the trainer sets itself: EXTRA_ARGS may not override them.
RESERVED_MODEL_ARGS = {
    "num_classes": "the dataset's class folders decide it",
    "pretrained": "use PRETRAINED",
    "checkpoint_path": "use CHECKPOINT_PATH",
    "pretrained_cfg": "use MODEL_NAME with a tag, e.g. resnet50.a1_in1k",
    "features_only": "this trainer trains classifiers",
    "in_chans": "images are read as RGB",
}
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")
_SOURCES = ("hf-hub:", "local-dir:")


def check_model_name(name: str) -> None:
    if name.startswith(_SOURCES) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise utils.ConfigError(f"MODEL_NAME={name!r} is not a timm model{hint}")


def check_model_args(name: str, extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """EXTRA_ARGS as create_model keyword arguments; unknown keys are rejected by name.

    The model is built on the meta device (no memory, no weights, milliseconds) with the
    arguments, so the architecture itself says which keys it accepts.
    """
    kwargs = dict(extra_args or {})
    reserved = sorted(set(kwargs) & set(RESERVED_MODEL_ARGS))
    if reserved:
        raise utils.ConfigError("EXTRA_ARGS may not set " + "; ".join(
            f"{key} ({RESERVED_MODEL_ARGS[key]})" for key in reserved))
    if not kwargs or name.startswith(_SOURCES):
        return kwargs
    unknown: list[str] = []
    trial = dict(kwargs)
    while True:
        problem = _build_on_meta(name, trial)
        found = _UNEXPECTED.search(problem or "")
        if not found or found.group(1) not in trial:
            break
        unknown.append(found.group(1))
        trial.pop(found.group(1))
    if unknown:
        raise utils.ConfigError(f"EXTRA_ARGS has keys {name} does not take: "
                                f"{', '.join(sorted(unknown))}")
    if problem and _build_on_meta(name, {}) is None:  # fails only with the arguments
        raise utils.ConfigError(f"EXTRA_ARGS {utils.one_line(str(kwargs), 200)} rejected by "
                                f"{name}: {problem}")
    return kwargs


def _build_on_meta(name: str, kwargs: dict[str, Any]) -> str | None:
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # any error a model's __init__ raises for bad arguments
        return f"{type(exc).__name__}: {utils.one_line(str(exc), 200)}"
    return None


def create_model(name: str, *, pretrained: bool, kwargs: dict[str, Any],
                 num_classes: int | None = None, offline: str | None = None) -> nn.Module:
    """A timm model; `num_classes=None` keeps the pretrained head (reset it with `set_classes`).

    Creating it before the dataset is staged makes a missing pretrained download fail first.
    """
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except (OSError, RuntimeError) as exc:  # hub, URL and file errors are OSErrors
        if not pretrained:
            raise
        raise hub.pretrained_error(name, exc, offline) from exc


def set_classes(model: nn.Module, num_classes: int) -> None:
    """A new, randomly initialised classifier when the class count differs from the head's."""
    if model.num_classes != num_classes:
        log.info("new classifier: %d -> %d classes", model.num_classes, num_classes)
        model.reset_classifier(num_classes)


def architecture(model: nn.Module, name: str) -> str:
    """The registered architecture behind MODEL_NAME (a tag or hub source resolved)."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or name


def same_architecture(model_name: str, architecture_name: str) -> bool:
    """Whether MODEL_NAME names this architecture, its pretrained tag and hub source aside
    (resnet50.a1_in1k and hf-hub:timm/resnet50.a1_in1k are resnet50)."""
    from timm.models import parse_model_name, split_model_name_tag

    _, name = parse_model_name(model_name)
    return split_model_name_tag(name.rsplit("/", 1)[-1])[0] == architecture_name


def classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    return {k for k in model.state_dict() if prefix is not None and k.startswith(prefix + ".")}


# -- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically: a reader (or a background upload) never sees a half-written file."""
    with utils.atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT,
                    "created_at": dt.datetime.now(dt.UTC).isoformat(),
                    "versions": {"timm": timm.__version__, "torch": str(torch.__version__)},
                    **state}, tmp)


def weights_only(source: Path, dest: Path) -> None:
    """Write the weights-only form of the checkpoint `source` to `dest`: its inference weights
    as `model`, without the optimizer, schedule, scaler and training weights a resume needs.
    Memory-mapped: only the tensors kept are read (this runs beside training)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    torch.save({"model": inference_weights(checkpoint),
                **{k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}}, dest)


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    return checkpoint.get("optimizer") is None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Weights and plain containers only: any checkpoint, trusted or not, loads without running
    # code (the contract's rule; this format needs nothing more).
    checkpoint = utils.load_torch_checkpoint(path)
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found not in READABLE_FORMATS:
        raise utils.CheckpointError(f"{path.name} is not a {CHECKPOINT_FORMAT} checkpoint "
                                    f"(format: {found or 'unknown, another framework'})")
    return checkpoint


def inference_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the checkpoint's metrics were measured with: the EMA's when it has one."""
    return checkpoint.get("ema") or checkpoint["model"]


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device,
                          exportable: bool | None = None) -> nn.Module:
    """The checkpoint's inference weights in eval mode; `exportable=True` selects timm's
    ONNX/trace-friendly layer variants (export.py)."""
    model = timm.create_model(checkpoint["model_name"], pretrained=False,
                              num_classes=len(checkpoint["class_names"]), exportable=exportable,
                              **checkpoint.get("model_kwargs", {}))
    load_weights(model, inference_weights(checkpoint))
    return model.to(device).eval()


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], *,
                 skip: set[str] = frozenset()) -> None:
    """Load a state dict, as a CheckpointError when it does not fit the architecture."""
    wanted = {k: v for k, v in weights.items() if k not in skip}
    try:
        missing, unexpected = model.load_state_dict(wanted, strict=not skip)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1:2] or [str(exc)]
        raise utils.CheckpointError("checkpoint weights do not fit the model: "
                                    f"{utils.one_line(first[0], 300)}") from None
    if set(missing) - skip or unexpected:
        raise utils.CheckpointError(f"checkpoint weights do not fit the model: missing "
                                    f"{sorted(set(missing) - skip)[:5]}, unexpected "
                                    f"{sorted(unexpected)[:5]}")
