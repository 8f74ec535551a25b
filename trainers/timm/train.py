"""Train a timm image classifier on the platform contract (timm trainer).

The platform runs this as a job configured by environment variables (see --help; a flag wins
over its variable). It stages datasets/{DATASET_ID}.zip (image folders train/<class>/...,
val/<class>/...), fine-tunes a timm model, reports every epoch to the backend and MLflow, uploads
checkpoints/job-{JOB_ID}/{epoch-N,best,last}.pt, evaluates best.pt at the end (per-class report
and confusion matrix under artifacts/job-{JOB_ID}/) and ends `completed`, `failed` or `cancelled`.

Several GPUs or nodes: `torchrun --nproc_per_node=N train.py` (DDP; NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import options
import utils

if TYPE_CHECKING:  # heavy (torch, timm): imported by `train` when a job runs
    from distributed import Dist
    from training_run import Run

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "timm"
SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.TRAIN_SETTINGS, PRETRAINED=True, EPOCHS=10, BATCH_SIZE=32,
                        LEARNING_RATE=0.001),
    (
        utils.Setting("MODEL_NAME", "str", "resnet50", "timm model name, optionally with a "
                      "pretrained tag (resnet50, resnet50.a1_in1k, convnext_tiny, "
                      "vit_small_patch16_224, ...)."),
        utils.Setting("IMAGE_SIZE", "int", None, "Input image size in pixels; default: the "
                      "model's pretrained input size (224 for resnet50).", minimum=8),
        utils.Setting("NUM_WORKERS", "int", None, "Data-loader worker processes per training "
                      "process; default: min(8, CPUs per process).", minimum=0, group="advanced"),
        utils.Setting("OPTIMIZER", "str", "adamw", "timm optimizer (create_optimizer_v2): adamw, "
                      "sgd, lamb, lion, ..."),
        utils.Setting("WEIGHT_DECAY", "float", 0.05, "Weight decay (not applied to biases and "
                      "norms).", minimum=0),
        utils.Setting("SCHEDULER", "str", "cosine", "Learning-rate schedule "
                      "(create_scheduler_v2), stepped every update.",
                      choices=("cosine", "tanh", "poly", "constant", "none")),
        utils.Setting("WARMUP_EPOCHS", "int", 1, "Epochs of linear learning-rate warmup from 1e-5.",
                      minimum=0),
        utils.Setting("LABEL_SMOOTHING", "float", 0.1, "Label smoothing of the cross-entropy loss.",
                      minimum=0, maximum=0.99),
        utils.Setting("MIXUP", "float", 0.0, "Mixup alpha (0: off).", minimum=0),
        utils.Setting("CUTMIX", "float", 0.0, "CutMix alpha (0: off).", minimum=0),
        utils.Setting("EMA", "bool", False, "Keep an exponential moving average of the weights "
                      "(ModelEmaV3): validated, and used by evaluate/predict."),
        utils.Setting("EMA_DECAY", "float", 0.9998, "EMA decay (warmed up from 0).", minimum=0,
                      maximum=1, group="advanced"),
        utils.Setting("AMP", "str", "auto", "Mixed precision on CUDA: auto (bf16 where supported, "
                      "else fp16), bf16, fp16 or off; always off on CPU.",
                      choices=("auto", "bf16", "fp16", "off")),
        utils.Setting("CHANNELS_LAST", "bool", True, "Channels-last memory format (faster "
                      "convolutions with AMP on GPUs).", group="advanced"),
        utils.Setting("COMPILE", "bool", False, "torch.compile the model (slower start, faster "
                      "steps).", group="advanced"),
        utils.Setting("HFLIP", "float", 0.5, "Horizontal-flip probability in training.", minimum=0,
                      maximum=1, group="advanced"),
        utils.Setting("CROP_SCALE", "float", 0.08, "Smallest area fraction of the random-resized "
                      "crop in training.", minimum=0.01, maximum=1, group="advanced"),
        utils.Setting("AUTO_AUGMENT", "str", None, "timm augmentation policy, e.g. "
                      "rand-m9-mstd0.5-inc1 (default: none).", group="advanced"),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("train", SETTINGS, train, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="train.py", options=options.OPTIONS)


def train(job: utils.Job) -> utils.JobResult:
    import hub

    cfg = job.cfg
    # Before timm (and huggingface_hub) is imported: offline, a download must fail at once.
    offline = hub.prepare_hub(cfg.pretrained and not cfg.checkpoint_path)
    from distributed import distributed
    from training_run import build_run

    model_kwargs = check_settings(cfg)
    with distributed(job, cfg.device) as dist:
        run = build_run(job, dist, model_kwargs, offline)
        best_epoch = fit(job, run, dist)
        if not dist.is_main:
            return utils.JobResult()
        return finish(job, run, best_epoch, dist.device)


def check_settings(cfg) -> dict[str, Any]:
    """Everything timm can check before any download: names, EXTRA_ARGS' model keywords (its
    schema checked the rest before the job started), the augmentation policy."""
    import timm.optim
    from timm.data import create_transform

    from model import check_model_args, check_model_name

    problems: list[str] = []
    model_kwargs = options.split(cfg.extra_args)["model"]
    if not cfg.checkpoint_path:  # with one, the architecture comes from the checkpoint
        try:
            check_model_name(cfg.model_name)
            model_kwargs = check_model_args(cfg.model_name, model_kwargs)
        except utils.ConfigError as exc:
            problems.append(str(exc))
    if cfg.optimizer not in timm.optim.list_optimizers():
        problems.append(f"OPTIMIZER={cfg.optimizer!r} is not a timm optimizer")
    if cfg.auto_augment:
        try:
            create_transform(32, is_training=True, auto_augment=cfg.auto_augment)
        except Exception as exc:  # timm asserts on a policy string it cannot parse
            problems.append(f"AUTO_AUGMENT={cfg.auto_augment!r} is not a timm policy "
                            f"({type(exc).__name__})")
    if problems:
        raise utils.ConfigError("; ".join(problems))
    return model_kwargs


def fit(job: utils.Job, run: Run, dist: Dist) -> int | None:
    """Train the remaining epochs; returns the best epoch (None when nothing was trained)."""
    from engine import train_one_epoch, validate
    from model import weights_only

    cfg = job.cfg
    out_dir = job.work_dir / "checkpoints"
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    best_value, best_epoch = -math.inf, None
    per_image: list[tuple[list[int], list[float]]] = []  # the last validation's, for the UI
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        job.start_epoch(epoch)
        run.train_loader.sampler.set_epoch(epoch)
        training = train_one_epoch(
            epoch, run.net, run.train_loader, run.optimizer, run.loss_fn, dist=dist,
            precision=run.precision, scheduler=run.scheduler, mixup=run.mixup, ema=run.ema,
            model=run.model, channels_last=cfg.channels_last)
        dist.broadcast_buffers(run.eval_model)
        per_image.clear()
        result = validate(run.eval_model, run.val_loader, run.class_names, dist=dist,
                          precision=run.precision, channels_last=cfg.channels_last,
                          per_image=per_image)
        is_best = result.primary_metric_value > best_value
        if is_best:
            best_value, best_epoch = result.primary_metric_value, epoch
        checkpoint = None
        if dist.is_main:
            save_run(last_path, run, job, epoch=epoch, best_value=best_value,
                     metrics=result.metrics)
            if is_best:
                utils.link_or_copy(last_path, best_path)  # no second write of the bytes
            checkpoint = last_path
            log_epoch(epoch, cfg.epochs, training, result)
        stop = None
        try:
            # last.pt as it is; epoch-N.pt and best.pt as its weights-only form, made by the
            # upload worker from a snapshot (the EMA's weights, no optimizer).
            job.end_epoch(epoch, cfg.epochs, training, result, checkpoint=checkpoint,
                          is_best=is_best, weights=weights_only)
        except utils.JobCancelled as exc:  # rank 0 heard {"cancel": true}: every rank stops
            stop = exc
        if dist.from_main(stop is not None):
            raise stop or utils.JobCancelled(f"cancelled by the platform after epoch {epoch}")
    # Under torchrun, rank 0 validated its shard: the view shows those images (indices kept).
    job.send_validation_image_results(utils.classification_image_records(
        run.val_items, per_image, run.class_names, indices=list(run.val_loader.sampler)))
    return best_epoch


def save_run(path: Path, run: Run, job: utils.Job, *, epoch: int, best_value: float,
             metrics: dict[str, float]) -> None:
    from engine import PRIMARY_METRIC, TASK_TYPE
    from model import save_checkpoint

    scaler = run.precision.scaler
    save_checkpoint(
        path, model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict() if run.scheduler is not None else None,
        ema=run.ema.module.state_dict() if run.ema is not None else None,
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=epoch, epochs=job.cfg.epochs, best_value=best_value,
        model_name=run.model_name, model_kwargs=run.model_kwargs,
        class_names=run.class_names, data_config=run.data_config, task_type=TASK_TYPE,
        primary_metric=PRIMARY_METRIC, metrics=metrics, amp=run.precision.name,
        config={k: v for k, v in job.cfg.redacted().items() if v != "<redacted>"},
        provenance=job.provenance())


def log_epoch(epoch: int, epochs: int, training: utils.TrainingMetrics,
              result: utils.ValidationResult) -> None:
    log.info("epoch %d/%d: loss %.4f, train acc %.3f, lr %.2e, %.0f img/s | val acc %.3f, "
                   "top5 %.3f, loss %.4f", epoch, epochs, training.loss, training.accuracy,
                   training.learning_rate, training.extra_metrics["throughput_img_s"],
                   result.metrics["accuracy"], result.metrics["top5_accuracy"],
                   result.overall_loss)


def finish(job: utils.Job, run: Run, best_epoch: int | None, device) -> utils.JobResult:
    """Evaluate best.pt as saved (rank 0), upload its report, return the final metrics."""
    from data import ImageFolder, eval_loader, eval_transform
    from distributed import Dist
    from engine import validate
    from model import load_checkpoint, model_from_checkpoint
    from report import write_report

    checkpoint = load_checkpoint(job.work_dir / "checkpoints" / "best.pt")
    loader = eval_loader(ImageFolder(run.val_items, eval_transform(checkpoint["data_config"])),
                         job.cfg.batch_size, workers=run.val_loader.num_workers)
    result = validate(model_from_checkpoint(checkpoint, device), loader,
                      checkpoint["class_names"], dist=Dist(device=device),
                      precision=run.precision)
    paths = write_report(job.work_dir / "report", result, {
        "split": "val", "epoch": best_epoch, "images": len(run.val_items),
        "checkpoint": job.best_checkpoint_uri, "model_name": checkpoint["model_name"]})
    job.upload_artifacts(paths)
    job.log_metrics({f"final_{k}": v for k, v in result.metrics.items()}, step=best_epoch)
    print(f"best epoch {best_epoch}: accuracy {result.metrics['accuracy']:.4f} "
          f"({job.best_checkpoint_uri})")
    return utils.JobResult(
        metrics={**result.metrics, "loss": result.overall_loss, "best_epoch": best_epoch},
        checkpoint_path=job.best_checkpoint_uri)


if __name__ == "__main__":
    utils.exit_process(main())
