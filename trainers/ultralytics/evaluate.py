"""Evaluate an Ultralytics checkpoint on a dataset split.

CHECKPOINT_PATH + DATASET_ID (SPLIT=val by default, or test): the platform's metrics and
per-class metrics as JSON, the confusion matrix and the PR/F1 curves, all under
artifacts/job-{JOB_ID}/evaluation/; an MLflow run eval-{JOB_ID}; one validation result to the
backend. The checkpoint says its task, classes and image size: nothing is guessed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import utils

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "ultralytics"
SETTINGS = utils.with_defaults(utils.EVALUATE_SETTINGS, NUM_WORKERS=8)
PLOTS = ("confusion_matrix*.png", "*PR_curve.png", "*F1_curve.png", "*P_curve.png",
         "*R_curve.png")


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("evaluate", SETTINGS, evaluate, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="evaluate.py")


def evaluate(job: utils.Job) -> utils.JobResult:
    cfg = job.cfg
    import image_results

    import model

    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress to stdout
        info, result, out_dir, dataset = run_validation(job)
    report = out_dir / "metrics.json"
    report.write_text(json.dumps({
        "split": cfg.split, "checkpoint": cfg.checkpoint_path, "task_type": result.task_type,
        "metrics": result.metrics, "primary_metric": {
            result.primary_metric_name: result.primary_metric_value},
        "per_class_metrics": result.per_class_metrics,
        "confusion_matrix": result.confusion_matrix, "pr_curves": result.pr_curves,
        "class_names": result.class_names}, indent=2, ensure_ascii=False), encoding="utf-8")
    plots = sorted({p for pattern in PLOTS for p in out_dir.glob(pattern)})
    job.upload_artifacts([report, *plots], "evaluation")
    job.log_metrics({f"{cfg.split}_{k}": v for k, v in result.metrics.items()},
                    step=info.trained_epochs)
    job.send_validation_result(info.trained_epochs, result)
    image_results.send(job, info.path, info.task, dataset.splits[cfg.split], info.class_names,
                       split=cfg.split, imgsz=cfg.image_size or info.image_size or 640,
                       device=model.ultralytics_device(cfg.device))
    print(json.dumps(result.metrics))
    return utils.JobResult(metrics=result.metrics)


def run_validation(job: utils.Job):
    import runtime

    import model
    from data import prepare_dataset, require_split
    from metrics import validation_result

    cfg = job.cfg
    job.require_trusted_checkpoint()  # before any work: Ultralytics unpickles a whole model
    runtime.prepare(job.work_dir, job.cache_dir / "weights",
                    cpu_threads=runtime.cpu_threads(cfg.device))
    device = model.ultralytics_device(cfg.device)
    info = model.inspect_checkpoint(job.fetch_checkpoint(trusted_only=True))
    dataset = prepare_dataset(job.stage_dataset(), info.task, job.work_dir, cfg.max_bad_images,
                              val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if dataset.annotations is not None:
        job.record_split(dataset.annotations)
    require_split(dataset, cfg.split)
    if dataset.class_names != info.class_names:
        raise utils.DatasetError(f"the dataset's classes {dataset.class_names} differ from the "
                                 f"checkpoint's {info.class_names}")
    if info.keypoints and dataset.kpt_shape and info.keypoints.shape != dataset.kpt_shape:
        raise utils.DatasetError(f"the dataset's kpt_shape {list(dataset.kpt_shape)} differs "
                                 f"from the checkpoint's {list(info.keypoints.shape)}")

    from ultralytics import YOLO

    out_dir = job.work_dir / "evaluation"
    validator = None
    if info.task == "pose":  # Ultralytics' own, also reporting OKS
        import pose

        validator = pose.validator_class()
    metrics = YOLO(str(info.path), task=info.task).val(
        validator=validator, data=dataset.data, split=cfg.split,
        imgsz=cfg.image_size or info.image_size or 640, batch=cfg.batch_size, device=device,
        workers=cfg.num_workers, save_dir=str(out_dir), plots=True, save_json=False, verbose=True)
    result = validation_result(info.task, metrics, info.class_names)
    log.info("%s on %s: %s %.4f", info.path.name, cfg.split, result.primary_metric_name,
                   result.primary_metric_value)
    return info, result, Path(out_dir), dataset


if __name__ == "__main__":
    utils.exit_process(main())
