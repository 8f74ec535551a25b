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

import logging
from pathlib import Path
from typing import Any

import metrics as metric_names
import utils

log = logging.getLogger(f"trainer.{__name__}")


def platform_trainer(base: type, task: str) -> type:
    """The task's Ultralytics trainer, picking best.pt by the platform's primary metric.

    An epoch is the best only when it improved on every earlier one (the first always does):
    from scratch the metric sits at 0.0 for epochs, and a tie is not progress. Ultralytics
    itself rewrites best.pt on a tie (`best_fitness == fitness`); here best.pt stays the epoch
    that `is_best` named.
    """

    class PlatformTrainer(base):  # "Trainer" must stay in the name: Ultralytics checks it
        improved = False  # whether the latest validation beat every earlier one

        def validate(self):
            previous_best = self.best_fitness
            results, fitness = super().validate()
            if results is None:  # DDP ranks other than 0 do not validate
                self.improved = False
                return results, fitness
            # The validator's own numbers: `results` are rounded to 5 decimals, which would
            # call a real early gain (2.97e-5 -> 3.24e-5) a tie, though the platform is sent it.
            fitness = metric_names.primary_value(task, self.validator.metrics.results_dict)
            self.improved = previous_best is None or fitness > previous_best
            self.best_fitness = fitness if self.improved else previous_best
            return results, fitness

        def save_model(self):
            if self.improved or self.best_fitness != self.fitness:
                return super().save_model()
            # A tie: Ultralytics would overwrite best.pt with this epoch. Aim it elsewhere.
            best, self.best = self.best, self.wdir / "tied.pt"
            try:
                return super().save_model()
            finally:
                self.best.unlink(missing_ok=True)
                self.best = best

    if task == "pose":
        PlatformTrainer = pose_trainer(PlatformTrainer)
    PlatformTrainer.__name__ = PlatformTrainer.__qualname__ = f"Platform{base.__name__}"
    return PlatformTrainer


def pose_trainer(base: type) -> type:
    """Pose training that reports OKS (pose.validator_class) and keeps the skeleton: the model
    carries `kpt_skeleton` (0-based pairs from data.yaml's `skeleton`) beside Ultralytics' own
    `kpt_shape` and `kpt_names`, so the checkpoint describes its keypoints in full."""
    from copy import copy

    import pose

    class PoseTrainer(base):
        def get_validator(self):
            super().get_validator()  # Ultralytics' own, for what it sets on the trainer
            return pose.validator_class()(self.test_loader, save_dir=self.save_dir,
                                          args=copy(self.args), _callbacks=self.callbacks)

        def set_model_attributes(self):
            super().set_model_attributes()
            self.model.kpt_skeleton = [list(map(int, pair))
                                       for pair in self.data.get("skeleton") or ()]

    return PoseTrainer


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
        model.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        model.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.job.start_epoch(trainer.epoch + 1)  # the epoch the job's log lines belong to

    def on_train_epoch_end(self, trainer: Any) -> None:
        self._trained_epoch = trainer.epoch + 1  # Ultralytics counts from 0, the platform from 1
        # Now, before Ultralytics' validation: on a non-finite loss it would reload last.pt and
        # retry the epoch (three times, then a bare RuntimeError) instead of failing the job.
        self.job.check_finite(self._trained_epoch, metric_names.training_metrics(trainer))

    def on_fit_epoch_end(self, trainer: Any) -> None:
        names = class_names_of(trainer)
        validator_metrics = trainer.validator.metrics
        loss = metric_names.validation_loss(trainer.metrics or {})
        result = metric_names.validation_result(self.task, validator_metrics, names, loss)
        if self._trained_epoch is None:  # Ultralytics' final validation of best.pt
            self.final = result
            return
        epoch, self._trained_epoch = self._trained_epoch, None
        is_best = trainer.fitness is not None and getattr(trainer, "improved", False)
        checkpoint = self._snapshot(Path(trainer.last))
        training = metric_names.training_metrics(trainer)
        self.job.end_epoch(epoch, trainer.epochs, training, result, checkpoint=checkpoint,
                           is_best=is_best, epoch_time_s=trainer.epoch_time,
                           weights=strip_to_weights)
        self.last = result
        self.epochs_reported.append(epoch)
        if is_best:
            self.best_epoch = epoch
        log.info("epoch %d/%d: loss %.4f, %s %.4f%s", epoch, trainer.epochs,
                       training.loss or 0.0, result.primary_metric_name,
                       result.primary_metric_value, " (best)" if is_best else "")

    def _snapshot(self, last: Path) -> Path | None:
        """A copy of Ultralytics' last.pt with the job's provenance, replaced atomically:
        Ultralytics rewrites its own file in place every epoch, which the background upload's
        hard-link snapshot cannot survive."""
        if not last.is_file():
            return None
        from model import write_with_provenance

        return write_with_provenance(last, self.checkpoint, self.job.provenance())


def strip_to_weights(source: Path, dest: Path) -> None:
    """The weights-only form of an Ultralytics checkpoint, by Ultralytics' own strip_optimizer."""
    from ultralytics.utils.torch_utils import strip_optimizer

    if not strip_optimizer(source, str(dest)):
        raise utils.CheckpointError(f"Ultralytics could not strip {source.name}")


def class_names_of(trainer: Any) -> list[str]:
    from model import class_names

    return class_names(trainer.data["names"])
