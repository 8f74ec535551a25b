"""Train a Hugging Face transformers vision model on the platform contract.

The platform runs this as a job configured by environment variables (see --help; a flag wins
over its variable). TASK_TYPE picks the task (image_classification, object_detection,
semantic_segmentation; task.py); MODEL_NAME a Hub model (default: the task's). It stages
datasets/{DATASET_ID}.zip (or the folder), trains through `accelerate` (engine.py says why not
transformers' Trainer), reports every epoch to the backend and MLflow, uploads
checkpoints/job-{JOB_ID}/{epoch-N,best,last}.pt (last.pt resumable; the others, and a finished
job's last.pt, weights only) and ends `completed`, `failed` or `cancelled`.

Offline (PRETRAINED=false, or no network), the task's Hub names are built from small
configurations of the same architectures, with no download. Several GPUs or nodes:
`torchrun --nproc_per_node=N train.py` (DDP; NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import options
import utils
from architectures import OFFLINE_MODELS, default_model
from task import TASK_MODULES

if TYPE_CHECKING:  # heavy (torch, transformers): imported when a job runs
    from training_run import Run

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "huggingface"
DEFAULT_TASK = "image_classification"
_DEFAULT_MODELS = ", ".join(f"{default_model(t)} ({t})" for t in OFFLINE_MODELS
                            if default_model(t))

SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.TRAIN_SETTINGS, PRETRAINED=True, EPOCHS=10, BATCH_SIZE=16,
                        LEARNING_RATE=0.001, IMAGE_SIZE=None),
    (
        utils.Setting("TASK_TYPE", default=DEFAULT_TASK, help="The task to train.",
                      choices=tuple(TASK_MODULES)),
        utils.Setting("MODEL_NAME", help="Hugging Face Hub model name; default: the task's "
                      f"({_DEFAULT_MODELS}). Offline, the task's known names build a small "
                      "configuration of their architecture (capabilities.json lists them)."),
        utils.Setting("IMAGE_SIZE", "int", None, "Input image size in pixels (square); default: "
                      "the checkpoint's, else the Hub model's (224 where it names none) with "
                      "pretrained weights, 64 without.",
                      minimum=8),
        utils.Setting("WEIGHT_DECAY", "float", 0.0, "AdamW weight decay (not on biases and "
                      "norms).", minimum=0),
        utils.Setting("AMP", "str", "auto", "Mixed precision on CUDA: auto (bf16 where "
                      "supported, else fp16 with loss scaling), bf16, fp16 or off; always off "
                      "on CPU.", choices=("auto", "bf16", "fp16", "off"), group="advanced"),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("train", SETTINGS, train, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="train.py", options=options.OPTIONS)


def train(job: utils.Job) -> utils.JobResult:
    cfg = job.cfg
    # Before transformers (and huggingface_hub) is imported: offline, a download fails at once.
    offline = utils.prepare_hf_hub(cfg.pretrained and not cfg.checkpoint_path)
    from engine import build_accelerator
    from task import task_for
    from training_run import build_run

    settings = options.resolved(cfg.extra_args)
    accelerator = build_accelerator(
        cfg.device, cfg.amp, seed=cfg.seed,
        gradient_accumulation_steps=settings["gradient_accumulation_steps"])
    try:
        run = build_run(job, accelerator, task_for(cfg.task_type), offline, settings)
        best_epoch, best = fit(job, run, accelerator, settings)
        accelerator.wait_for_everyone()
        if not job.is_main:
            return utils.JobResult()
        return finish(job, run, best_epoch, best)
    finally:
        end_process_group()


def fit(job: utils.Job, run: Run, accelerator, settings: dict[str, Any],
        ) -> tuple[int | None, utils.ValidationResult | None]:
    """Train the remaining epochs; the best epoch and its validation (None: nothing trained)."""
    from engine import from_main, train_one_epoch, validate
    from model import weights_only

    cfg = job.cfg
    out_dir = job.work_dir / "checkpoints"
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    # Best of this attempt (as the timm trainer): a resumed job uploads a best.pt of its own.
    best_value, best_epoch, best = -math.inf, None, None
    validator = None
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        job.start_epoch(epoch)
        run.train_loader.set_epoch(epoch)
        training = train_one_epoch(accelerator, run.model, run.train_loader, run.optimizer,
                                   run.scheduler, task=run.task,
                                   max_grad_norm=settings["max_grad_norm"])
        # Per-image results are sent for the last validation only: keep them only then.
        validator = run.task.validator(run.splits.class_names,
                                       keep_per_image=epoch == cfg.epochs)
        result = validate(accelerator, run.model, run.val_loader, validator)
        is_best = result.primary_metric_value > best_value
        if is_best:
            best_value, best_epoch, best = result.primary_metric_value, epoch, result
        checkpoint = None
        if job.is_main:
            save_run(last_path, run, job, accelerator, epoch=epoch, best_value=best_value,
                     metrics=result.metrics)
            if is_best:
                utils.link_or_copy(last_path, best_path)  # no second write of the bytes
            checkpoint = last_path
            log.info("epoch %d/%d: loss %.4f, lr %.2e, %.0f img/s | val %s %.4f, loss %s",
                     epoch, cfg.epochs, training.loss, training.learning_rate,
                     training.extra_metrics["throughput_img_s"], result.primary_metric_name,
                     result.primary_metric_value, _fmt(result.overall_loss))
        stop = None
        try:
            # last.pt as it is; epoch-N.pt and best.pt as its weights-only form, made by the
            # upload worker from a snapshot.
            job.end_epoch(epoch, cfg.epochs, training, result, checkpoint=checkpoint,
                          is_best=is_best, weights=weights_only)
        except utils.JobCancelled as exc:  # the main process heard {"cancel": true}: all stop
            stop = exc
        if from_main(accelerator, stop is not None):
            raise stop or utils.JobCancelled(f"cancelled by the platform after epoch {epoch}")
    if validator is not None:
        job.send_validation_image_results(run.task.image_records(
            validator, run.splits, mask_dir=job.work_dir / "validation-masks",
            limit=cfg.val_image_results_max))
    return best_epoch, best


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_run(path: Path, run: Run, job: utils.Job, accelerator, *, epoch: int,
             best_value: float, metrics: dict[str, float]) -> None:
    from model import plain_config, save_checkpoint

    model = accelerator.unwrap_model(run.model)
    scaler = accelerator.scaler
    save_checkpoint(
        path, model=model.state_dict(), model_config=plain_config(model),
        model_name=run.model_name, class_names=run.splits.class_names,
        image_size=run.image_size, mean=list(run.task.input_mean),
        std=list(run.task.input_std),
        task_type=run.task.task_type, primary_metric=run.task.primary_metric, metrics=metrics,
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=epoch, epochs=job.cfg.epochs, best_value=best_value,
        config={k: v for k, v in job.cfg.redacted().items() if v != "<redacted>"},
        provenance=job.provenance())


def finish(job: utils.Job, run: Run, best_epoch: int | None,
           best: utils.ValidationResult | None) -> utils.JobResult:
    """The best epoch's report as results.json among the job's artifacts; the final metrics."""
    if best is None:  # resumed at the last epoch: nothing new was trained
        return utils.JobResult(checkpoint_path=job.best_checkpoint_uri)
    report = job.work_dir / "report" / "results.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "task_type": best.task_type, "split": "val", "epoch": best_epoch,
        "images": len(run.splits.val), "model_name": run.model_name, "metrics": best.metrics,
        "loss": best.overall_loss, "per_class_metrics": best.per_class_metrics,
        "confusion_matrix": best.confusion_matrix, "class_names": best.class_names,
        "checkpoint": job.best_checkpoint_uri}, indent=2, ensure_ascii=False))
    job.upload_artifacts([report])
    print(f"best epoch {best_epoch}: {best.primary_metric_name} "
          f"{best.primary_metric_value:.4f} ({job.best_checkpoint_uri})")
    return utils.JobResult(
        metrics={**best.metrics, "loss": best.overall_loss, "best_epoch": best_epoch},
        checkpoint_path=job.best_checkpoint_uri)


def end_process_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    utils.exit_process(main())

