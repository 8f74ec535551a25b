"""Train an image classifier on the platform contract (Hugging Face transformers trainer).

The platform runs this as a job configured by environment variables (see --help; a flag wins
over its variable). It stages datasets/{DATASET_ID}.zip, trains, reports every epoch to the
backend and MLflow, uploads checkpoints/job-{JOB_ID}/{epoch-N,best,last}.pt (last.pt resumable;
the others, and a finished job's last.pt, weights only) and ends with a `completed`, `failed` or
`cancelled` status.

FRAMEWORK: the template trains a tiny CNN (model.py) on image folders (data.py). Replace
`train_one_epoch`, `validate` and the model/data factories with your framework's code; keep
`main`, the settings table and the `job.end_epoch` call: they are the platform contract.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import options
import utils

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "huggingface"
TASK_TYPE = "image_classification"
PRIMARY_METRIC = "accuracy"

SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.TRAIN_SETTINGS, MODEL_NAME="google/vit-base-patch16-224", PRETRAINED=False,
                        EPOCHS=10, IMAGE_SIZE=64, BATCH_SIZE=32),
    (utils.Setting("WEIGHT_DECAY", "float", 0.0001, "AdamW weight decay.", minimum=0,
                   group="advanced"),
     utils.Setting("AMP", "bool", True, "Mixed precision on CUDA: bf16 where the GPU has it, "
                   "else fp16 with loss scaling; always off on CPU.", group="advanced")),
)


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("train", SETTINGS, train, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="train.py", options=options.OPTIONS)


def train(job: utils.Job) -> utils.JobResult:
    import numpy as np
    import torch

    from data import load_splits, make_loader
    from model import (
        check_model_args,
        create_model,
        load_checkpoint,
        resolve_device,
        save_checkpoint,
        weights_only,
    )

    cfg = job.cfg
    model_kwargs = check_model_args(cfg.model_name, cfg.extra_args)
    if cfg.pretrained:
        raise utils.ConfigError(f"MODEL_NAME={cfg.model_name} has no pretrained weights; "
                                "set PRETRAINED=false")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model_name, checkpoint = cfg.model_name, None
    if cfg.checkpoint_path:  # before the dataset: a checkpoint that cannot serve fails at once
        checkpoint = load_checkpoint(job.fetch_checkpoint())
        utils.check_checkpoint_model(cfg, checkpoint["model_name"])
        model_name = checkpoint["model_name"]
        model_kwargs = {**checkpoint.get("model_kwargs", {}), **model_kwargs}

    splits = load_splits(job.stage_dataset(), cfg.image_size, cfg.max_bad_images,
                         val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if splits.platform is not None:
        job.record_split(splits.platform)
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True,
                               workers=cfg.num_workers, seed=cfg.seed)
    val_loader = make_loader(splits.val, cfg.batch_size, shuffle=False, workers=cfg.num_workers)
    model = create_model(model_name, len(splits.class_names), **model_kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    precision = Precision.resolve(cfg.amp, device)

    start_epoch, best_value = 1, -math.inf
    if checkpoint is not None:
        start_epoch, best_value = restore(job, checkpoint, model, optimizer, scheduler,
                                          splits.class_names)

    out_dir = job.work_dir / "checkpoints"
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    best_result: utils.ValidationResult | None = None
    per_image: list[tuple[list[int], list[float]]] = []  # the last validation's, for the UI
    for epoch in range(start_epoch, cfg.epochs + 1):
        job.start_epoch(epoch)
        started = time.monotonic()
        training = train_one_epoch(model, train_loader, optimizer, device, precision)
        scheduler.step()
        per_image.clear()
        result = validate(model, val_loader, device, splits.class_names, per_image)
        is_best = result.primary_metric_value > best_value
        best_value = max(best_value, result.primary_metric_value)
        save_checkpoint(
            last_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), epoch=epoch, epochs=cfg.epochs,
            best_value=best_value, model_name=model_name, model_kwargs=model_kwargs,
            class_names=splits.class_names, image_size=cfg.image_size,
            mean=list(splits.train.transform.transforms[-1].mean),
            std=list(splits.train.transform.transforms[-1].std),
            task_type=TASK_TYPE, metrics=result.metrics,
            config={k: v for k, v in cfg.redacted().items() if v != "<redacted>"},
            versions={"torch": str(torch.__version__)}, provenance=job.provenance())
        if is_best:
            best_result = result
            utils.link_or_copy(last_path, best_path)  # no second write of the bytes
        training.learning_rate = optimizer.param_groups[0]["lr"]
        training.extra_metrics["throughput_img_s"] = round(
            len(splits.train) / max(time.monotonic() - started, 1e-9), 1)
        # last.pt as it is; epoch-N.pt and best.pt as its weights-only form, made by the upload.
        job.end_epoch(epoch, cfg.epochs, training, result, checkpoint=last_path,
                      is_best=is_best, weights=weights_only)
        log_epoch(epoch, cfg.epochs, training, result)

    job.send_validation_image_results(utils.classification_image_records(
        splits.val.items, per_image, splits.class_names))
    return finish(job, best_result, best_path)


def restore(job: utils.Job, checkpoint: dict[str, Any], model, optimizer, scheduler,
            class_names: list[str]) -> tuple[int, float]:
    """Resume an interrupted job (a resumable last.pt, epoch < its total) or fine-tune from a
    finished model (any weights-only checkpoint: epoch-N.pt, best.pt, a finished last.pt)."""
    from model import is_weights_only

    job.refuse_weights_only_resume(is_weights_only(checkpoint))
    if checkpoint["class_names"] != class_names:
        raise utils.CheckpointError(
            f"checkpoint classes {checkpoint['class_names']} differ from the dataset's "
            f"{class_names}")
    model.load_state_dict(checkpoint["model"])
    if not is_weights_only(checkpoint) and checkpoint["epoch"] < checkpoint["epochs"]:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        log.info("resuming after epoch %d", checkpoint["epoch"])
        return checkpoint["epoch"] + 1, checkpoint["best_value"]
    log.info("fine-tuning from a finished model (%d epochs)", checkpoint["epoch"])
    return 1, -math.inf


@dataclasses.dataclass(frozen=True)
class Precision:
    """AMP as resolved for the device: bf16 where the GPU has it, else fp16 with a loss scaler
    (against fp16 underflow); float32 on the CPU."""

    enabled: bool
    dtype: Any
    scaler: Any

    @classmethod
    def resolve(cls, amp: bool, device) -> Precision:
        import torch

        enabled = amp and device.type == "cuda"
        dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
        return cls(enabled, dtype, torch.amp.GradScaler(
            "cuda", enabled=enabled and dtype == torch.float16))


def train_one_epoch(model, loader, optimizer, device, precision: Precision
                    ) -> utils.TrainingMetrics:
    import torch
    import torch.nn.functional as F

    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    scaler = precision.scaler
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.enabled):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return utils.TrainingMetrics(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1))


def validate(model, loader, device, class_names: list[str],
             per_image: list[tuple[list[int], list[float]]] | None = None
             ) -> utils.ValidationResult:
    """Metrics over the split; with `per_image`, each image's top-5 (ids, probabilities) too."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    model.eval()
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    loss_sum, top5, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            k = min(5, n)
            top5 += (logits.topk(k, 1).indices == labels[:, None]).any(1).sum().item()
            np.add.at(confusion, (labels.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
            seen += len(labels)
            if per_image is not None:
                confidences, ids = logits.float().softmax(1).topk(k, 1)
                per_image.extend(zip(ids.tolist(), confidences.tolist(), strict=True))
    metrics, per_class = utils.classification_metrics(confusion, class_names, top5)
    return utils.ValidationResult(
        task_type=TASK_TYPE, metrics=metrics, primary_metric_name=PRIMARY_METRIC,
        primary_metric_value=metrics[PRIMARY_METRIC], overall_loss=loss_sum / max(seen, 1),
        per_class_metrics=per_class, confusion_matrix=confusion.tolist(),
        class_names=list(class_names))


def log_epoch(epoch: int, epochs: int, training: utils.TrainingMetrics,
              result: utils.ValidationResult) -> None:
    log.info("epoch %d/%d: loss %.4f, train acc %.3f, val acc %.3f, val loss %.4f",
                   epoch, epochs, training.loss, training.accuracy,
                   result.metrics["accuracy"], result.overall_loss)


def finish(job: utils.Job, best: utils.ValidationResult | None,
           best_path: Path) -> utils.JobResult:
    """Write the best epoch's report, upload it with the job's artifacts."""
    import json

    if best is None:  # resumed at the last epoch: nothing new was trained
        return utils.JobResult(checkpoint_path=job.best_checkpoint_uri)
    report = job.work_dir / "results.json"
    report.write_text(json.dumps({
        "task_type": best.task_type, "metrics": best.metrics,
        "per_class_metrics": best.per_class_metrics, "confusion_matrix": best.confusion_matrix,
        "class_names": best.class_names, "best_checkpoint": job.best_checkpoint_uri,
    }, indent=2))
    job.upload_artifacts([report])
    print(f"best checkpoint: {best_path} ({job.best_checkpoint_uri})")
    print(f"results: {report}")
    return utils.JobResult(metrics={**best.metrics, "loss": best.overall_loss},
                           checkpoint_path=job.best_checkpoint_uri)


if __name__ == "__main__":
    utils.exit_process(main())
