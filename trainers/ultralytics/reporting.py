"""Ultralytics' training loop, hooked into the platform contract.

Two pieces. `platform_trainer` subclasses the task's Ultralytics trainer so that best.pt, early
stopping and `is_best` follow the platform's primary metric (Ultralytics' own fitness mixes box and
mask mAP for segmentation and top-1 with top-5 for classification). `EpochReporter` is a pair of
Ultralytics callbacks that hand each trained epoch to `job.end_epoch` exactly once: Ultralytics
fires `on_fit_epoch_end` once more after the last epoch, for its final validation of best.pt; that
call has no training epoch before it, so it is kept as the final result instead of being sent.

What the platform keeps (docs/checkpoints.md) is a copy of each epoch's resumable last.pt and, for
epoch-N.pt and best.pt, that copy stripped by Ultralytics' own `strip_optimizer` (the EMA weights in
FP16, no optimizer: what Ultralytics itself leaves when training ends), which the contract's upload
worker makes from a snapshot. Ultralytics' files in its save_dir are its working files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import metrics as metric_names
import utils


def platform_trainer(base: type, task: str) -> type:
    """The task's Ultralytics trainer, picking best.pt by the platform's primary metric."""

    class PlatformTrainer(base):  # "Trainer" must stay in the name: Ultralytics checks it
        def validate(self):
            previous_best = self.best_fitness
            results, fitness = super().validate()
            if results is None:  # DDP ranks other than 0 do not validate
                return results, fitness
            fitness = metric_names.primary_value(task, results)
            if previous_best is None or fitness > previous_best:
                self.best_fitness = fitness
            else:
                self.best_fitness = previous_best
            return results, fitness

    PlatformTrainer.__name__ = PlatformTrainer.__qualname__ = f"Platform{base.__name__}"
    return PlatformTrainer


class EpochReporter:
    """`on_train_epoch_end` + `on_fit_epoch_end` -> one `job.end_epoch` per trained epoch."""

    def __init__(self, job: utils.Job, task: str, checkpoint_dir: Path):
        self.job, self.task = job, task
        self.checkpoint = checkpoint_dir / "last.pt"
        self.final: utils.ValidationResult | None = None  # the final validation of best.pt
        self.last: utils.ValidationResult | None = None
        self.best_epoch: int | None = None
        self.epochs_reported: list[int] = []
        self._trained_epoch: int | None = None

    def attach(self, model: Any) -> None:
        model.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_train_epoch_end(self, trainer: Any) -> None:
        self._trained_epoch = trainer.epoch + 1  # Ultralytics counts from 0, the platform from 1

    def on_fit_epoch_end(self, trainer: Any) -> None:
        names = class_names_of(trainer)
        validator_metrics = trainer.validator.metrics
        loss = metric_names.validation_loss(trainer.metrics or {})
        result = metric_names.validation_result(self.task, validator_metrics, names, loss)
        if self._trained_epoch is None:  # Ultralytics' final validation of best.pt
            self.final = result
            return
        epoch, self._trained_epoch = self._trained_epoch, None
        is_best = trainer.fitness is not None and trainer.best_fitness == trainer.fitness
        checkpoint = self._snapshot(Path(trainer.last))
        training = metric_names.training_metrics(trainer)
        self.job.end_epoch(epoch, trainer.epochs, training, result, checkpoint=checkpoint,
                           is_best=is_best, epoch_time_s=trainer.epoch_time,
                           weights=strip_to_weights)
        self.last = result
        self.epochs_reported.append(epoch)
        if is_best:
            self.best_epoch = epoch
        utils.log.info("epoch %d/%d: loss %.4f, %s %.4f%s", epoch, trainer.epochs,
                       training.loss or 0.0, result.primary_metric_name,
                       result.primary_metric_value, " (best)" if is_best else "")

    def _snapshot(self, last: Path) -> Path | None:
        """A copy of Ultralytics' last.pt, replaced atomically: Ultralytics rewrites its own file
        in place every epoch, which the background upload's hard-link snapshot cannot survive."""
        if not last.is_file():
            return None
        with utils.atomic_path(self.checkpoint) as tmp:
            shutil.copyfile(last, tmp)
        return self.checkpoint


def strip_to_weights(source: Path, dest: Path) -> None:
    """The weights-only form of an Ultralytics checkpoint, by Ultralytics' own strip_optimizer."""
    from ultralytics.utils.torch_utils import strip_optimizer

    if not strip_optimizer(source, str(dest)):
        raise utils.CheckpointError(f"Ultralytics could not strip {source.name}")


def class_names_of(trainer: Any) -> list[str]:
    from model import class_names

    return class_names(trainer.data["names"])
