"""A training run assembled from the settings: where it starts, the model, the data, and the
optimization (timm's create_optimizer_v2, create_scheduler_v2, ModelEmaV3, Mixup, losses).

`build_run` is the one entry point; every rank builds the same run. Downloads (checkpoint,
pretrained weights, dataset) happen on each node's local rank 0 first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn

import engine
import options
import utils
from data import (
    ImageFolder,
    data_config_for,
    eval_loader,
    eval_transform,
    load_splits,
    plain_data_config,
    train_loader,
    train_transform,
)
from distributed import Dist
from model import (
    architecture,
    create_model,
    inference_weights,
    load_checkpoint,
    load_weights,
    same_architecture,
    set_classes,
)

log = logging.getLogger(f"trainer.{__name__}")


@dataclasses.dataclass
class Run:
    """Everything one training run holds."""

    model: nn.Module  # the bare timm model: checkpoints, EMA and validation use it
    net: nn.Module  # what the loop calls: the model, or its DDP / compiled wrapper
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, stepped per update; None for SCHEDULER=none
    loss_fn: nn.Module
    mixup: Any
    precision: engine.Precision
    train_loader: Any
    val_loader: Any
    val_items: list[tuple[Path, int]]
    class_names: list[str]
    data_config: dict[str, Any]
    model_name: str
    model_kwargs: dict[str, Any]
    start_epoch: int

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation measures and checkpoints offer for inference."""
        return self.ema.module if self.ema is not None else self.model


@dataclasses.dataclass
class Start:
    """Where training starts: pretrained or random weights, or a checkpoint."""

    model_name: str
    model_kwargs: dict[str, Any]
    checkpoint: dict[str, Any] | None = None
    resume: bool = False


def build_run(job: utils.Job, dist: Dist, model_kwargs: dict[str, Any],
              offline: str | None) -> Run:
    cfg = job.cfg
    extra = options.split(cfg.extra_args)  # the augmentation and mixing keywords of EXTRA_ARGS
    random_seed(cfg.seed, dist.rank)
    start = starting_point(job, dist, model_kwargs)
    checkpoint = start.checkpoint
    # Weights are downloaded once per node, and before the dataset: a missing pretrained
    # download fails in seconds, not after a long staging.
    model = dist.local_first(lambda: create_model(
        start.model_name, pretrained=cfg.pretrained and checkpoint is None,
        kwargs=start.model_kwargs, offline=offline,
        num_classes=len(checkpoint["class_names"]) if checkpoint else None))
    root = dist.local_first(lambda: staged_and_checked(job), share=True)
    # Local rank 0 checked every image; here the cached verdict drops the same bad ones.
    splits = load_splits(root, max_bad_images=cfg.max_bad_images, val_fraction=cfg.val_fraction,
                         split_seed=cfg.split_seed)
    start_epoch = restore_weights(model, start, splits.class_names)
    data_config = (plain_data_config(checkpoint["data_config"], cfg.image_size) if checkpoint
                   else data_config_for(model, cfg.image_size))

    device = dist.device
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(dist)
    loader = train_loader(
        ImageFolder(splits.train, train_transform(data_config, hflip=cfg.hflip,
                                                  crop_scale=cfg.crop_scale,
                                                  auto_augment=cfg.auto_augment,
                                                  **extra["transform"])),
        cfg.batch_size, workers=workers, seed=cfg.seed, dist=dist)
    precision = engine.resolve_precision(cfg.amp, device)
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.learning_rate,
                                    weight_decay=cfg.weight_decay)
    scheduler = None
    if cfg.scheduler != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.scheduler, num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=len(loader))
    net = model
    if dist.enabled:  # DDP broadcasts rank 0's weights: every rank starts identical
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # After DDP's broadcast, so every rank's average starts from the same weights.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    if start.resume:
        restore_training_state(checkpoint, optimizer, scheduler, ema, precision)
    if cfg.compile:
        net = torch.compile(net)
    mixup = engine.build_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing,
                               len(splits.class_names), **extra["mixup"])
    return Run(
        model=model, net=net, ema=ema, optimizer=optimizer, scheduler=scheduler,
        loss_fn=engine.build_loss(cfg.label_smoothing, mixup).to(device), mixup=mixup,
        precision=precision, train_loader=loader,
        val_loader=eval_loader(ImageFolder(splits.val, eval_transform(data_config)),
                               cfg.batch_size, workers=workers, dist=dist),
        val_items=splits.val, class_names=splits.class_names, data_config=data_config,
        model_name=architecture(model, start.model_name), model_kwargs=start.model_kwargs,
        start_epoch=start_epoch)


def starting_point(job: utils.Job, dist: Dist, model_kwargs: dict[str, Any]) -> Start:
    """MODEL_NAME (+ EXTRA_ARGS), or CHECKPOINT_PATH: its architecture, resumed or fine-tuned."""
    cfg = job.cfg
    if not cfg.checkpoint_path:
        return Start(cfg.model_name, model_kwargs)
    checkpoint = load_checkpoint(dist.local_first(job.fetch_checkpoint, share=True))
    resume = resumes(checkpoint, cfg.checkpoint_path)
    if resume and checkpoint["epoch"] >= cfg.epochs:
        raise utils.ConfigError(f"EPOCHS={cfg.epochs} leaves nothing to resume: the "
                                f"checkpoint already finished epoch {checkpoint['epoch']}")
    utils.check_checkpoint_model(cfg, checkpoint["model_name"], same_architecture)
    return Start(checkpoint["model_name"],
                 {**checkpoint.get("model_kwargs", {}), **model_kwargs}, checkpoint, resume)


def resumes(checkpoint: dict[str, Any], checkpoint_path: str) -> bool:
    """Resume an interrupted run (its last.pt, or an epoch-N.pt before its final epoch);
    fine-tune from a finished model: a final-epoch checkpoint, or any best.pt (by name a
    finished model, though its content is some epoch's state)."""
    return (checkpoint["epoch"] < checkpoint["epochs"]
            and PurePosixPath(checkpoint_path).name != "best.pt")


def staged_and_checked(job: utils.Job) -> Path:
    """The dataset's root, every split and image checked (each node's local rank 0 does it)."""
    root = job.stage_dataset()
    splits = load_splits(root, max_bad_images=job.cfg.max_bad_images,
                         val_fraction=job.cfg.val_fraction, split_seed=job.cfg.split_seed)
    if splits.platform is not None:
        job.record_split(splits.platform)
    log.info("dataset: %d classes, %d training and %d validation images",
             len(splits.class_names), len(splits.train), len(splits.val))
    return root


def restore_weights(model: nn.Module, start: Start, class_names: list[str]) -> int:
    """The weights to start from; returns the first epoch to train.

    Fine-tuning on other classes keeps everything but the classifier, which starts afresh.
    """
    checkpoint = start.checkpoint
    if checkpoint is None:
        set_classes(model, len(class_names))
        return 1
    same_classes = checkpoint["class_names"] == class_names
    if start.resume:
        if not same_classes:
            raise utils.CheckpointError(
                f"cannot resume: the checkpoint's classes {checkpoint['class_names'][:10]} "
                f"differ from the dataset's {class_names[:10]}")
        load_weights(model, checkpoint["model"])
        log.info("resuming after epoch %d of %d", checkpoint["epoch"], checkpoint["epochs"])
        return checkpoint["epoch"] + 1
    load_weights(model, inference_weights(checkpoint))
    if not same_classes:
        model.reset_classifier(len(class_names))
    log.info("fine-tuning from a finished model (%d epochs%s)", checkpoint["epoch"],
             "" if same_classes else ", new classifier for this dataset's classes")
    return 1


def restore_training_state(checkpoint: dict[str, Any], optimizer, scheduler, ema,
                           precision: engine.Precision) -> None:
    """Optimizer moments and learning rate, schedule, EMA and loss scale as they were."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler"):
        scheduler.load_state_dict(checkpoint["scheduler"])
    if ema is not None and checkpoint.get("ema"):
        ema.module.load_state_dict(checkpoint["ema"])
    if precision.scaler is not None and checkpoint.get("scaler"):
        precision.scaler.load_state_dict(checkpoint["scaler"])


def default_workers(dist: Dist) -> int:
    """NUM_WORKERS unset: the CPUs this process may use, split among the node's processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cpus or 1) // dist.local_world_size - 1))
