"""Evaluate a checkpoint on a dataset split (Hugging Face transformers trainer).

CHECKPOINT_PATH + DATASET_ID (SPLIT=val by default, or test): metrics, per-class report and
confusion matrix as JSON under artifacts/job-{JOB_ID}/evaluation/, an MLflow run eval-{JOB_ID},
and one validation result to the backend.
"""

from __future__ import annotations

import json

import utils

FRAMEWORK = "huggingface"
SETTINGS = utils.EVALUATE_SETTINGS


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("evaluate", SETTINGS, evaluate, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="evaluate.py")


def evaluate(job: utils.Job) -> utils.JobResult:
    from data import (
        ImageFolder,
        build_transform,
        make_loader,
        split_items,
    )
    from model import load_checkpoint, model_from_checkpoint, resolve_device
    from train import validate

    cfg = job.cfg
    device = resolve_device(cfg.device)
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    class_names = checkpoint["class_names"]
    items = split_items(job.stage_dataset(), cfg.split, class_names,
                        max_bad_images=cfg.max_bad_images, val_fraction=cfg.val_fraction,
                        split_seed=cfg.split_seed)
    image_size = cfg.image_size or checkpoint["image_size"]
    dataset = ImageFolder(items,
                          build_transform(image_size, train=False, mean=checkpoint["mean"],
                                          std=checkpoint["std"]))
    loader = make_loader(dataset, cfg.batch_size, shuffle=False, workers=cfg.num_workers)
    per_image: list[tuple[list[int], list[float]]] = []
    result = validate(model_from_checkpoint(checkpoint, device), loader, device, class_names,
                      per_image)

    out_dir = job.work_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "metrics.json"
    report.write_text(json.dumps({
        "split": cfg.split, "checkpoint": cfg.checkpoint_path, "images": len(dataset),
        "metrics": result.metrics, "loss": result.overall_loss,
        "per_class_metrics": result.per_class_metrics,
        "confusion_matrix": result.confusion_matrix, "class_names": class_names}, indent=2))
    job.upload_artifacts([report], "evaluation")
    job.log_metrics({f"{cfg.split}_{k}": v for k, v in result.metrics.items()})
    job.send_validation_result(checkpoint["epoch"], result)
    job.send_validation_image_results(
        utils.classification_image_records(dataset.items, per_image, class_names),
        split=cfg.split)
    print(json.dumps(result.metrics))
    return utils.JobResult(metrics=result.metrics)


if __name__ == "__main__":
    utils.exit_process(main())
