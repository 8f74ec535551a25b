"""Predict with a checkpoint (Hugging Face transformers trainer).

CHECKPOINT_PATH + INPUT_PATH (storage key of an image, a .zip of images, or a prefix ending in
/; or a local file/folder: `python predict.py --checkpoint-path best.pt --input-path ./images`)
-> predictions.json with one record per image as the checkpoint's task writes it
(classification: the TOP_K classes; detection: the boxes at CONF_THRESHOLD and above, no NMS:
DETR-family models predict one box per object; semantic segmentation: a class-index PNG mask
per image), uploaded with the mask files under artifacts/job-{JOB_ID}/predictions/.
"""

from __future__ import annotations

import json

import utils

FRAMEWORK = "huggingface"
SETTINGS = utils.PREDICT_SETTINGS


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("predict", SETTINGS, predict, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="predict.py")


def predict(job: utils.Job) -> utils.JobResult:
    utils.prepare_hf_hub(False)  # the checkpoint holds the architecture: nothing to download
    from engine import build_accelerator
    from model import load_checkpoint, model_from_checkpoint, task_of

    cfg = job.cfg
    device = build_accelerator(cfg.device, "off").device
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    task = task_of(checkpoint, None)
    class_names = checkpoint["class_names"]
    model = model_from_checkpoint(task, checkpoint, device)
    out_dir = job.work_dir / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = task.predict(model, job.stage_inputs(), class_names,
                           image_size=cfg.image_size or checkpoint["image_size"], device=device,
                           out_dir=out_dir, confidence=cfg.conf_threshold)
    for record in records:  # a ranked list of classes keeps TOP_K of them
        if "top_k" in record:
            record["top_k"] = record["top_k"][:cfg.top_k]

    out = out_dir / "predictions.json"
    out.write_text(json.dumps({"task_type": checkpoint["task_type"], "class_names": class_names,
                               "predictions": records}, indent=2, ensure_ascii=False))
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):  # mask files keep folders
        folder = path.parent.relative_to(out_dir).as_posix()
        job.upload_artifacts([path], "predictions" + ("" if folder == "." else f"/{folder}"))
    print(out)
    return utils.JobResult(metrics={"images": len(records)})


if __name__ == "__main__":
    utils.exit_process(main())
