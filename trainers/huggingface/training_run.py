"""A training run assembled from the settings: where it starts (Hub weights, a small offline
configuration, or a checkpoint: resumed or fine-tuned), the task's data, the optimizer and
schedule, all placed by `accelerate`. `build_run` is the one entry point; every process builds
the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any

import torch

import utils
from data import make_loader
from engine import main_first
from model import is_weights_only, load_checkpoint, load_weights, task_of
from task import Splits, Task

log = logging.getLogger(f"trainer.{__name__}")

# Sizes when IMAGE_SIZE is not given and the model's configuration names none: with pretrained
# weights the common Hub input size, else the small offline configurations' size.
PRETRAINED_IMAGE_SIZE, OFFLINE_IMAGE_SIZE = 224, 64


@dataclasses.dataclass
class Run:
    """Everything one training run holds."""

    task: Task
    model: Any  # as accelerate prepared it (DDP-wrapped under torchrun)
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    splits: Splits
    model_name: str
    image_size: int
    start_epoch: int


@dataclasses.dataclass
class Start:
    """Where training starts: MODEL_NAME, or a checkpoint (resumed or fine-tuned)."""

    task: Task
    model_name: str
    image_size: int
    checkpoint: dict[str, Any] | None = None
    resume: bool = False


def build_run(job: utils.Job, accelerator, task: Task, offline: str | None,
              options: dict[str, Any]) -> Run:
    from accelerate.utils import set_seed

    cfg = job.cfg
    set_seed(cfg.seed)
    start = starting_point(job, accelerator, task)
    pretrained = cfg.pretrained
    if start.checkpoint is None:  # before the dataset: a missing download fails in seconds
        checked = main_first(accelerator, lambda: check_model(
            start.task, start.model_name, pretrained=cfg.pretrained, offline=offline))
        pretrained = checked.pretrained
        if checked.image_size and not cfg.image_size:  # the Hub model's own input size
            start = dataclasses.replace(start, image_size=checked.image_size)
        elif pretrained != cfg.pretrained and not cfg.image_size:
            start = dataclasses.replace(start, image_size=OFFLINE_IMAGE_SIZE)
    root = main_first(accelerator, lambda: staged(job))
    splits = start.task.load_splits(
        root, cfg, image_size=start.image_size,
        class_names=start.checkpoint["class_names"] if start.resume else None)
    if job.is_main:
        if splits.platform is not None:
            job.record_split(splits.platform)
        log.info("dataset: %d classes, %d training and %d validation images",
                 len(splits.class_names), len(splits.train), len(splits.val))
    model = main_first(accelerator, lambda: starting_model(start, splits.class_names,
                                                           pretrained=pretrained,
                                                           offline=offline))
    workers = cfg.num_workers
    train_loader = make_loader(splits.train, cfg.batch_size, collate=start.task.collate,
                               shuffle=True, workers=workers, seed=cfg.seed)
    val_loader = make_loader(splits.val, cfg.batch_size, collate=start.task.collate,
                             shuffle=False, workers=workers)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, options)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / options["gradient_accumulation_steps"])
    scheduler = build_scheduler(optimizer, options, updates_per_epoch * cfg.epochs)
    start_epoch = 1
    if start.resume:
        checkpoint = start.checkpoint
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if accelerator.scaler is not None and checkpoint.get("scaler"):
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
        log.info("resuming after epoch %d of %d", checkpoint["epoch"], checkpoint["epochs"])
    return Run(task=start.task, model=model, optimizer=optimizer, scheduler=scheduler,
               train_loader=train_loader, val_loader=val_loader, splits=splits,
               model_name=start.model_name, image_size=start.image_size,
               start_epoch=start_epoch)


def starting_point(job: utils.Job, accelerator, task: Task) -> Start:
    """MODEL_NAME (default: the task's), or CHECKPOINT_PATH: its task and architecture."""
    cfg = job.cfg
    if not cfg.checkpoint_path:
        size = cfg.image_size or (PRETRAINED_IMAGE_SIZE if cfg.pretrained
                                  else OFFLINE_IMAGE_SIZE)
        return Start(task, cfg.model_name or task.default_model, size)
    checkpoint = load_checkpoint(main_first(accelerator, job.fetch_checkpoint))
    job.refuse_weights_only_resume(is_weights_only(checkpoint))
    resume = resumes(checkpoint, cfg.checkpoint_path)
    if resume and checkpoint["epoch"] >= cfg.epochs:
        raise utils.ConfigError(f"EPOCHS={cfg.epochs} leaves nothing to resume: the "
                                f"checkpoint already finished epoch {checkpoint['epoch']}")
    utils.check_checkpoint_model(cfg, checkpoint["model_name"])
    checkpoint_task = task_of(checkpoint, cfg.task_type if cfg.given("TASK_TYPE") else None)
    size = checkpoint["image_size"] if resume else (cfg.image_size or checkpoint["image_size"])
    return Start(checkpoint_task, checkpoint["model_name"], size, checkpoint, resume)


def resumes(checkpoint: dict[str, Any], checkpoint_path: str) -> bool:
    """Resume an interrupted run from its resumable last.pt; fine-tune from a finished model:
    any weights-only checkpoint, a final-epoch one, or any best.pt (by name a finished model)."""
    return (not is_weights_only(checkpoint) and checkpoint["epoch"] < checkpoint["epochs"]
            and PurePosixPath(checkpoint_path).name != "best.pt")


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    image_size: int | None  # the configuration's square input size, when it names one
    pretrained: bool  # False: no network and no cache, so the architecture is built offline


def check_model(task: Task, model_name: str, *, pretrained: bool,
                offline: str | None) -> ModelCheck:
    """MODEL_NAME can be built: its configuration is at hand (the Hub or the local cache) when
    it is not one the task builds offline. Milliseconds, and before the dataset is staged.

    With no network (and the weights not in the local cache), a name the task builds offline
    trains that architecture from random weights, with one warning (the issue's "offline: the
    same architectures built from their configuration"); any other name fails in one line.
    """
    if not pretrained and model_name in task.offline_models():
        return ModelCheck(None, False)
    from transformers import AutoConfig

    try:
        size = getattr(AutoConfig.from_pretrained(model_name), "image_size", None)
    except (OSError, ValueError) as exc:
        if pretrained and offline and model_name in task.offline_models():
            log.warning("PRETRAINED=true but %s's weights are not in the local cache and %s: "
                        "training its architecture from random weights (PRETRAINED=false "
                        "says so up front)", model_name, offline)
            return ModelCheck(None, False)
        if pretrained:
            raise utils.hf_pretrained_error(model_name, exc, offline) from exc
        raise utils.ConfigError(
            f"MODEL_NAME={model_name} is not one this trainer builds offline "
            f"({', '.join(task.offline_models())}) and its configuration is not in the local "
            "cache") from None
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    return ModelCheck(size if isinstance(size, int) else None, pretrained)


def staged(job: utils.Job) -> Path:
    return job.stage_dataset()


def starting_model(start: Start, class_names: list[str], *, pretrained: bool,
                   offline: str | None) -> torch.nn.Module:
    """The model to train. A checkpoint's weights load into its own architecture; fine-tuning
    on other classes keeps every weight whose shape still fits (the heads start afresh)."""
    checkpoint = start.checkpoint
    if checkpoint is None:
        try:
            return start.task.create_model(start.model_name, class_names, pretrained=pretrained,
                                           image_size=start.image_size)
        except OSError as exc:  # hub, URL and file errors
            if not pretrained:
                raise
            raise utils.hf_pretrained_error(start.model_name, exc, offline) from exc
    same_classes = checkpoint["class_names"] == class_names
    if start.resume and not same_classes:
        raise utils.CheckpointError(
            f"cannot resume: the checkpoint's classes {checkpoint['class_names'][:10]} differ "
            f"from the dataset's {class_names[:10]}")
    if same_classes:
        model = start.task.model_from_config(checkpoint["model_config"])
        load_weights(model, checkpoint["model"])
    else:
        config = {**checkpoint["model_config"], "id2label": dict(enumerate(class_names)),
                  "label2id": {name: i for i, name in enumerate(class_names)}}
        config.pop("num_labels", None)
        model = start.task.model_from_config(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        kept = {k: v for k, v in checkpoint["model"].items() if shapes.get(k) == v.shape}
        model.load_state_dict(kept, strict=False)
    if not start.resume:
        log.info("fine-tuning from a finished model (%d epochs%s)", checkpoint["epoch"],
                 "" if same_classes else ", new classifier for this dataset's classes")
    return model


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    options: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (one-dimensional parameters), as transformers'
    Trainer does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr,
                             betas=(options["adam_beta1"], options["adam_beta2"]),
                             eps=options["adam_epsilon"])


def build_scheduler(optimizer, options: dict[str, Any], total_updates: int):
    """transformers' schedule by name, stepped per update; warmup_steps under 1 is a fraction
    of all updates (as in TrainingArguments)."""
    from transformers import get_scheduler

    warmup = options["warmup_steps"]
    warmup_updates = math.ceil(warmup * total_updates) if warmup < 1 else int(warmup)
    return get_scheduler(options["lr_scheduler_type"], optimizer,
                         num_warmup_steps=warmup_updates, num_training_steps=total_updates)
