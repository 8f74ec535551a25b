"""The training loop: `train_one_epoch` and `validate`, each returning the epoch's metrics.

Built from timm's parts: Mixup/CutMix, LabelSmoothingCrossEntropy / SoftTargetCrossEntropy,
ModelEmaV3, NativeScaler (fp16 loss scaling), `accuracy`, and its schedulers' per-update steps.
Sums stay on the device during an epoch (no GPU sync per step) and are reduced across ranks once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import NativeScaler, accuracy
from torch import nn

import utils
from distributed import Dist

log = logging.getLogger(f"trainer.{__name__}")

TASK_TYPE = "image_classification"
PRIMARY_METRIC = "accuracy"


@dataclasses.dataclass
class Precision:
    """AMP as resolved for the device: bf16 or fp16 autocast on CUDA, float32 elsewhere."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: NativeScaler | None = None  # fp16 only: bf16 has float32's range

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """AMP: auto (bf16 where the GPU has it, else fp16), bf16, fp16 or off; always off on CPU."""
    if device.type != "cuda":
        if setting not in ("auto", "off"):
            log.info("AMP=%s: mixed precision is for CUDA; training in float32 on %s",
                     setting, device)
        return Precision(device.type)
    if setting == "off":
        return Precision(device.type)
    if setting == "auto":
        setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "bf16":
        return Precision(device.type, torch.bfloat16)
    return Precision(device.type, torch.float16, NativeScaler(device="cuda"))


def build_mixup(mixup: float, cutmix: float, label_smoothing: float,
                num_classes: int, **options: Any) -> Mixup | None:
    """`options`: more Mixup keywords (EXTRA_ARGS' mixup_prob, ..., options.py)."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes, **options)


def build_loss(label_smoothing: float, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:  # Mixup already smooths the soft targets it makes
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def train_one_epoch(epoch: int, net: nn.Module, loader, optimizer, loss_fn: nn.Module, *,
                    dist: Dist, precision: Precision, scheduler=None, mixup: Mixup | None = None,
                    ema=None, model: nn.Module | None = None,
                    channels_last: bool = False) -> utils.TrainingMetrics:
    """One pass over the training set. `net` is what runs forward (DDP / compiled wrapper),
    `model` the bare module the EMA follows. Epochs are 1-based; the scheduler steps per update.
    """
    net.train()
    device = dist.device
    updates_per_epoch = len(loader)
    num_updates = (epoch - 1) * updates_per_epoch
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    started = time.monotonic()
    for images, labels in loader:
        if mixup is not None and len(labels) % 2:  # Mixup pairs images: drop an odd one out
            images, labels = images[:-1], labels[:-1]
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        with precision.autocast():
            logits = net(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(model, step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        n = len(labels)
        loss_sum += loss.detach().float() * n
        correct += accuracy(logits.detach().float(), labels)[0] * (n / 100.0)
        seen += n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.monotonic() - started
    total_loss, total_correct, total_seen, total_time = dist.sum(
        [loss_sum.item(), correct.item(), seen, elapsed])
    train_time = total_time / dist.world_size  # the ranks ran side by side
    return utils.TrainingMetrics(
        loss=total_loss / max(total_seen, 1), accuracy=total_correct / max(total_seen, 1),
        learning_rate=optimizer.param_groups[0]["lr"],
        extra_metrics={"throughput_img_s": round(total_seen / max(train_time, 1e-9), 1),
                       "train_time_s": round(train_time, 3), "images": int(total_seen),
                       "updates": num_updates})


def validate(model: nn.Module, loader, class_names: list[str], *, dist: Dist,
             precision: Precision, channels_last: bool = False,
             per_image: list[tuple[list[int], list[float]]] | None = None
             ) -> utils.ValidationResult:
    """Metrics over the whole split: each rank scores its shard, the sums are reduced once.

    With `per_image`, this rank's images' top-5 (ids, probabilities) too, in its loader's order.
    """
    model.eval()
    device = dist.device
    n = len(class_names)
    k = min(5, n)
    confusion = torch.zeros(n * n, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            top5 += accuracy(logits, labels, topk=(k,))[0].double() * (len(labels) / 100.0)
            confusion += torch.bincount(labels * n + logits.argmax(1), minlength=n * n)
            if per_image is not None:
                confidences, ids = logits.softmax(1).topk(k, 1)
                per_image.extend(zip(ids.tolist(), confidences.tolist(), strict=True))
    totals = dist.sum(np.concatenate([[loss_sum.item(), top5.item()],
                                      confusion.cpu().numpy()]))
    matrix = np.rint(totals[2:]).astype(np.int64).reshape(n, n)
    seen = int(matrix.sum())
    metrics, per_class = utils.classification_metrics(matrix, class_names,
                                                      int(round(totals[1])))
    return utils.ValidationResult(
        task_type=TASK_TYPE, metrics=metrics, primary_metric_name=PRIMARY_METRIC,
        primary_metric_value=metrics[PRIMARY_METRIC], overall_loss=totals[0] / max(seen, 1),
        per_class_metrics=per_class, confusion_matrix=matrix.tolist(),
        class_names=list(class_names))
