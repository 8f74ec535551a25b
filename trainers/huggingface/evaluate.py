"""Evaluate a checkpoint on a dataset split (Hugging Face transformers trainer).

CHECKPOINT_PATH + DATASET_ID (SPLIT=val by default, or test): the checkpoint's task scores the
split under the contract's metric names; the report (metrics, per-class metrics, confusion
matrix) as artifacts/job-{JOB_ID}/evaluation/results.json, an MLflow run eval-{JOB_ID}, one
validation result and the per-image results to the backend.
"""

from __future__ import annotations

import json

import utils
from task import TASK_MODULES

FRAMEWORK = "huggingface"
SETTINGS = utils.merge_settings(utils.EVALUATE_SETTINGS, (
    utils.Setting("TASK_TYPE", help="The task; default: the checkpoint's (another fails).",
                  choices=tuple(TASK_MODULES), group="advanced"),
))


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("evaluate", SETTINGS, evaluate, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="evaluate.py")


def evaluate(job: utils.Job) -> utils.JobResult:
    utils.prepare_hf_hub(False)  # the checkpoint holds the architecture: nothing to download
    from data import make_loader
    from engine import build_accelerator, validate
    from model import load_checkpoint, model_from_checkpoint, task_of

    cfg = job.cfg
    accelerator = build_accelerator(cfg.device, "off")
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    task = task_of(checkpoint, cfg.task_type)
    image_size = cfg.image_size or checkpoint["image_size"]
    splits = task.load_splits(job.stage_dataset(), cfg, image_size=image_size,
                              class_names=checkpoint["class_names"], splits=(cfg.split,))
    loader = make_loader(splits.val, cfg.batch_size, collate=task.collate, shuffle=False,
                         workers=cfg.num_workers)
    model = model_from_checkpoint(task, checkpoint, accelerator.device)
    validator = task.validator(splits.class_names, keep_per_image=True)
    result = validate(accelerator, model, accelerator.prepare_data_loader(loader), validator)

    report = job.work_dir / "evaluation" / "results.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "task_type": result.task_type, "split": cfg.split, "epoch": checkpoint.get("epoch"),
        "images": len(splits.val), "checkpoint": cfg.checkpoint_path,
        "model_name": checkpoint["model_name"], "metrics": result.metrics,
        "loss": result.overall_loss, "per_class_metrics": result.per_class_metrics,
        "confusion_matrix": result.confusion_matrix, "class_names": result.class_names},
        indent=2, ensure_ascii=False))
    job.upload_artifacts([report], "evaluation")
    job.log_metrics({f"{cfg.split}_{k}": v for k, v in result.metrics.items()})
    job.send_validation_result(checkpoint.get("epoch") or 0, result)
    job.send_validation_image_results(
        task.image_records(validator, splits, mask_dir=job.work_dir / "validation-masks",
                           limit=cfg.val_image_results_max), split=cfg.split)
    print(json.dumps({**result.metrics, "loss": result.overall_loss}))
    return utils.JobResult(metrics={**result.metrics, "loss": result.overall_loss})


if __name__ == "__main__":
    utils.exit_process(main())
