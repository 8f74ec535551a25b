"""Predict with an Ultralytics checkpoint.

CHECKPOINT_PATH + INPUT_PATH (storage key of an image, a .zip of images, or a prefix ending in
/; or a local file or folder) -> predictions.json and one annotated image per input, uploaded
under artifacts/job-{JOB_ID}/predictions/. Per image: boxes as pixel `xyxy`, class id and name,
confidence; segmentation adds each mask as a polygon in pixels; pose adds each object's
keypoints as `[x, y, confidence]` in pixels, in the order of the file's `keypoint_names` (its
`skeleton` pairs them); classification gives the TOP_K classes instead. CONF_THRESHOLD and
IOU_THRESHOLD filter the detections.

By hand, after the sample's training (`pixi run train`), on the sample's own images; the
outputs land in the git-ignored .sample/artifacts/job-<id>/predictions/:
  python predict.py --checkpoint-path .work/sample/ultralytics/train/weights/best.pt \\
      --input-path datasets/sample.zip --storage-type local --local-storage-root .sample
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import utils

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "ultralytics"
SETTINGS = utils.PREDICT_SETTINGS


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("predict", SETTINGS, predict, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="predict.py")


def predict(job: utils.Job) -> utils.JobResult:
    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress to stdout
        info, predictions, annotated = run_predictions(job)
    out = job.work_dir / "predictions" / "predictions.json"
    keypoints = ({"keypoint_names": list(info.keypoints.names),
                  "skeleton": [list(pair) for pair in info.keypoints.skeleton]}
                 if info.keypoints else {})
    out.write_text(json.dumps({"task_type": info.task_type, "class_names": info.class_names,
                               **keypoints, "checkpoint": job.cfg.checkpoint_path,
                               "predictions": predictions}, indent=2, ensure_ascii=False),
                   encoding="utf-8")
    job.upload_artifacts([out], "predictions")
    job.upload_artifacts(annotated, "predictions/annotated")
    print(out)
    return utils.JobResult(metrics={"images": len(predictions)})


def run_predictions(job: utils.Job):
    import runtime

    import model

    cfg = job.cfg
    job.require_trusted_checkpoint()  # before any work: Ultralytics unpickles a whole model
    runtime.prepare(job.work_dir, job.cache_dir / "weights",
                    cpu_threads=runtime.cpu_threads(cfg.device))
    device = model.ultralytics_device(cfg.device)
    info = model.inspect_checkpoint(job.fetch_checkpoint(trusted_only=True))
    images = job.stage_inputs()

    from ultralytics import YOLO

    yolo = YOLO(str(info.path), task=info.task)
    annotated_dir = job.work_dir / "predictions" / "annotated"
    annotated_dir.mkdir(parents=True, exist_ok=True)
    predictions: list[dict[str, Any]] = []
    annotated: list[Path] = []
    names = unique_names(images)
    for start in range(0, len(images), cfg.batch_size):
        batch = images[start:start + cfg.batch_size]
        results = yolo.predict(source=[str(p) for p in batch], conf=cfg.conf_threshold,
                               iou=cfg.iou_threshold, imgsz=cfg.image_size or info.image_size
                               or 640, device=device, verbose=False, save=False)
        for path, result in zip(batch, results, strict=True):
            entry = describe(result, info.class_names, cfg.top_k)
            picture = annotated_dir / annotated_name(names[path])
            save_annotated(result, picture)
            predictions.append({"image": names[path], "annotated": picture.name, **entry})
            annotated.append(picture)
    log.info("%d images predicted", len(predictions))
    return info, predictions, annotated


def unique_names(images: list[Path]) -> dict[Path, str]:
    """A name per image: its file name, prefixed with a number when two share one."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for index, path in enumerate(images):
        name = path.name if path.name.lower() not in taken else f"{index:05d}_{path.name}"
        taken.add(name.lower())
        names[path] = name
    return names


def annotated_name(name: str) -> str:
    return name if name.lower().endswith((".jpg", ".jpeg")) else name + ".jpg"


def describe(result: Any, class_names: list[str], top_k: int) -> dict[str, Any]:
    """One image's predictions as plain JSON: pixels, class ids and names, confidences."""
    height, width = result.orig_shape
    entry: dict[str, Any] = {"width": int(width), "height": int(height)}
    if result.probs is not None:
        probs = result.probs.data.float().cpu()
        top = probs.topk(min(top_k, len(class_names)))
        entry["top_k"] = [{"class_id": int(i), "class_name": class_names[int(i)],
                           "confidence": round(float(v), 6)}
                          for v, i in zip(top.values, top.indices, strict=True)]
        return entry
    detections = []
    polygons = result.masks.xy if result.masks is not None else None
    keypoints = result.keypoints.data.float().cpu().tolist() if result.keypoints is not None \
        else None
    for i, (box, conf, cls) in enumerate(zip(result.boxes.xyxy.tolist(),
                                             result.boxes.conf.tolist(),
                                             result.boxes.cls.tolist(), strict=True)):
        detection = {"class_id": int(cls), "class_name": class_names[int(cls)],
                     "confidence": round(float(conf), 6),
                     "box_xyxy": [round(float(v), 2) for v in box]}
        if polygons is not None:
            detection["polygon"] = [[round(float(x), 2), round(float(y), 2)]
                                    for x, y in polygons[i]]
        if keypoints is not None:  # x, y, confidence (visibility: 1 when a model has none)
            detection["keypoints"] = [[round(float(k[0]), 2), round(float(k[1]), 2),
                                       round(float(k[2]) if len(k) > 2 else 1.0, 6)]
                                      for k in keypoints[i]]
        detections.append(detection)
    entry["detections"] = detections
    return entry


def save_annotated(result: Any, path: Path) -> None:
    from PIL import Image

    bgr = result.plot()  # boxes, masks and labels drawn by Ultralytics (BGR array)
    with utils.atomic_path(path) as tmp:
        Image.fromarray(bgr[..., ::-1]).save(tmp, format="JPEG", quality=90)


if __name__ == "__main__":
    utils.exit_process(main())
