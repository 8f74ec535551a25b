"""Predict with a checkpoint (timm trainer).

CHECKPOINT_PATH + INPUT_PATH (storage key of an image, a .zip of images, or a prefix ending in
/; or a local file/folder: `python predict.py --checkpoint-path best.pt --input ./images`)
-> predictions.json with the top-k classes and probabilities per image, uploaded under
artifacts/job-{JOB_ID}/predictions/. Class names and preprocessing come from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import utils

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "timm"
# CONF_THRESHOLD / IOU_THRESHOLD filter detections: a classifier keeps its TOP_K classes.
SETTINGS = tuple(s for s in utils.with_defaults(utils.PREDICT_SETTINGS, BATCH_SIZE=64)
                 if s.name not in ("CONF_THRESHOLD", "IOU_THRESHOLD"))


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("predict", SETTINGS, predict, framework=FRAMEWORK,
                         argv=with_input_alias(sys.argv[1:] if argv is None else argv),
                         description=__doc__, prog="predict.py")


def with_input_alias(argv: list[str]) -> list[str]:
    """`--input ./images` (the short form people type) is `--input-path ./images`."""
    return ["--input-path" if arg == "--input" else
            "--input-path=" + arg.removeprefix("--input=") if arg.startswith("--input=") else arg
            for arg in argv]


def predict(job: utils.Job) -> utils.JobResult:
    import hub

    hub.prepare_hub(need_weights=False)  # the weights are in the checkpoint
    import torch

    from data import eval_transform, plain_data_config
    from distributed import resolve_device
    from model import load_checkpoint, model_from_checkpoint

    cfg = job.cfg
    device = resolve_device(cfg.device)
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    class_names = checkpoint["class_names"]
    model = model_from_checkpoint(checkpoint, device)
    transform = eval_transform(plain_data_config(checkpoint["data_config"], cfg.image_size))
    images = job.stage_inputs()
    names = display_names(images)
    k = min(cfg.top_k, len(class_names))
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(images), cfg.batch_size):
            batch, tensors = [], []
            for path in images[start:start + cfg.batch_size]:
                tensor = load_image(path, transform)
                if tensor is None:
                    predictions.append({"image": names[path], "error": "unreadable image"})
                    continue
                batch.append(path)
                tensors.append(tensor)
            if not tensors:
                continue
            probs = model(torch.stack(tensors).to(device)).float().softmax(1).cpu()
            top = probs.topk(k, 1)
            for path, values, indices in zip(batch, top.values, top.indices, strict=True):
                predictions.append({"image": names[path], "top_k": [
                    {"class_id": int(i), "class_name": class_names[int(i)],
                     "confidence": round(float(v), 6)}
                    for v, i in zip(values, indices, strict=True)]})
    scored = sum("top_k" in p for p in predictions)
    if not scored:
        raise utils.DatasetError(f"none of the {len(images)} images at {cfg.input_path} could "
                                 "be read")

    out = job.work_dir / "predictions" / "predictions.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(out) as tmp:
        tmp.write_text(json.dumps({
            "task_type": checkpoint["task_type"], "model_name": checkpoint["model_name"],
            "checkpoint": cfg.checkpoint_path, "class_names": class_names, "top_k": k,
            "predictions": predictions}, indent=2, ensure_ascii=False), encoding="utf-8")
    job.upload_artifacts([out], "predictions")
    print(out)
    return utils.JobResult(metrics={"images": scored,
                                    "unreadable": len(predictions) - scored})


def display_names(images: list[Path]) -> dict[Path, str]:
    """Each image's path relative to the images' common folder (names may repeat across
    sub-folders)."""
    if len(images) == 1:
        return {images[0]: images[0].name}
    common = Path(os.path.commonpath([str(p.parent) for p in images]))
    return {p: p.relative_to(common).as_posix() for p in images}


def load_image(path: Path, transform):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        log.warning("unreadable image skipped: %s", path.name)
        return None


if __name__ == "__main__":
    utils.exit_process(main())
