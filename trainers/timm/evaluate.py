"""Evaluate a checkpoint on a dataset split (timm trainer).

CHECKPOINT_PATH + DATASET_ID (SPLIT=val by default, or test): metrics, a per-class report and a
confusion matrix under artifacts/job-{JOB_ID}/evaluation/, an MLflow run eval-{JOB_ID}, and one
validation result to the backend. The model, its class names and its preprocessing all come from
the checkpoint; a split whose classes differ from the checkpoint's fails.
"""

from __future__ import annotations

import json

import utils

FRAMEWORK = "timm"
SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.EVALUATE_SETTINGS, BATCH_SIZE=64),
    (utils.Setting("AMP", "str", "auto", "Mixed precision on CUDA: auto, bf16, fp16 or off; "
                   "always off on CPU.", choices=("auto", "bf16", "fp16", "off")),),
)


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("evaluate", SETTINGS, evaluate, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="evaluate.py")


def evaluate(job: utils.Job) -> utils.JobResult:
    import hub

    hub.prepare_hub(need_weights=False)  # the weights are in the checkpoint
    from data import (
        ImageFolder,
        eval_loader,
        eval_transform,
        plain_data_config,
        split_items,
    )
    from distributed import Dist, resolve_device
    from engine import resolve_precision, validate
    from model import load_checkpoint, model_from_checkpoint
    from report import write_report

    cfg = job.cfg
    device = resolve_device(cfg.device)
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    class_names = checkpoint["class_names"]
    items = split_items(job.stage_dataset(), cfg.split, class_names,
                        max_bad_images=cfg.max_bad_images, val_fraction=cfg.val_fraction,
                        split_seed=cfg.split_seed)
    data_config = plain_data_config(checkpoint["data_config"], cfg.image_size)
    loader = eval_loader(ImageFolder(items, eval_transform(data_config)), cfg.batch_size,
                         workers=cfg.num_workers)
    result = validate(model_from_checkpoint(checkpoint, device), loader, class_names,
                      dist=Dist(device=device), precision=resolve_precision(cfg.amp, device))

    paths = write_report(job.work_dir / "evaluation", result, {
        "split": cfg.split, "checkpoint": cfg.checkpoint_path, "epoch": checkpoint["epoch"],
        "images": len(items), "model_name": checkpoint["model_name"],
        "data_config": data_config})
    job.upload_artifacts(paths, "evaluation")
    job.log_metrics({f"{cfg.split}/{k}": v for k, v in result.metrics.items()}
                    | {f"{cfg.split}/loss": result.overall_loss})
    job.send_validation_result(checkpoint["epoch"], result)
    print(json.dumps({**result.metrics, "loss": result.overall_loss}))
    return utils.JobResult(metrics={**result.metrics, "loss": result.overall_loss})


if __name__ == "__main__":
    utils.exit_process(main())
