"""Per-image results of a validation, for the platform's per-image view
(`POST /validation-image-results`, contract section 3; how the images are chosen: docs/ui-views.md).

Ultralytics' validator keeps no per-image record (its batches are letterboxed and its
predictions kept at conf 0.001 for the mAP sweep), so the validated model is run once more with
`predict` over the split: boxes in the original image's pixels, at the confidence a person
reads (PREDICT_CONF), and the same code path as predict.py. It costs a second pass over the
split, bounded: at most PREDICTED_PER_RESULT x VAL_IMAGE_RESULTS_MAX images, evenly spaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import utils

log = logging.getLogger(f"trainer.{__name__}")

PREDICT_CONF = 0.25  # Ultralytics' own predict default: the boxes a person would be shown
PREDICTED_PER_RESULT = 5  # images predicted per result sent: mistakes are found among them


def send(job: utils.Job, weights: Path, task: str, split_path: Path, class_names: list[str], *,
         split: str, imgsz: int, device: Any) -> int:
    """Predict the split with `weights` and send the per-image results of the latest validation.
    Returns how many were queued."""
    limit = job.cfg.get("VAL_IMAGE_RESULTS_MAX")
    if not job.is_main or not limit or not weights.is_file():
        return 0
    from data import find_images

    found = find_images(split_path)
    step = max(len(found) / (PREDICTED_PER_RESULT * limit), 1.0)
    indices = [int(i * step) for i in range(min(len(found), PREDICTED_PER_RESULT * limit))]
    # A split given as a .txt list (bad images skipped) names images by their common folder.
    base = split_path if split_path.is_dir() else Path(os.path.commonpath(found)).parent
    from ultralytics import YOLO

    model = YOLO(str(weights), task=task)
    records = []
    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress to stdout
        for index in indices:
            image = found[index]
            [result] = model.predict(str(image), imgsz=imgsz, conf=PREDICT_CONF, device=device,
                                     verbose=False, save=False)
            name = image.relative_to(base).as_posix()
            records.append(record(task, index, image, name, result, class_names,
                                  mask_dir=job.work_dir / "validation-masks" / split))
    return job.send_validation_image_results(records, split=split)


def record(task: str, index: int, image: Path, name: str, result: Any,
           class_names: list[str], mask_dir: Path | None = None) -> dict[str, Any]:
    if task == "classify":
        probs = result.probs
        true_id = class_id_of_folder(image.parent.name, class_names)
        return utils.classification_image_record(
            index, image, name, true_id, list(probs.top5), [float(c) for c in probs.top5conf],
            class_names)
    height, width = result.orig_shape
    predicted = [(int(c), *xyxy, float(conf)) for c, xyxy, conf in zip(
        result.boxes.cls.tolist(), result.boxes.xyxy.tolist(), result.boxes.conf.tolist(),
        strict=True)]
    entry = utils.detection_image_record(index, image, name, true_boxes(image, width, height),
                                         predicted, class_names)
    if task == "pose":
        entry.update(keypoint_fields(image, width, height, result, class_names))
    if task == "segment":  # the masks as images (the contract's fields); boxes in extra_data
        boxes = {key: entry.pop(key) for key in ("true_boxes", "predicted_boxes", "iou")}
        entry.update(true_mask_path=None, predicted_mask_path=None, extra_data=boxes)
        if mask_dir is not None:
            stem = Path(name).with_suffix(".png")
            predicted_polygons = [(int(c), xy) for c, xy in zip(
                result.boxes.cls.tolist(), result.masks.xy if result.masks is not None else [],
                strict=False)]
            entry["true_mask_file"] = write_mask(
                mask_dir / "true" / stem, width, height, true_polygons(image, width, height))
            entry["predicted_mask_file"] = write_mask(
                mask_dir / "predicted" / stem, width, height, predicted_polygons)
    return entry


def class_id_of_folder(folder: str, class_names: list[str]) -> int:
    """A classification image's class from its folder: the class's name (image folders), or
    its id (platform annotations are converted to class-id folders, keeping their order)."""
    if folder in class_names:
        return class_names.index(folder)
    return int(folder)


def keypoint_fields(image: Path, width: int, height: int, result: Any,
                    class_names: list[str]) -> dict[str, Any]:
    """`true_keypoints` / `predicted_keypoints` ([{class_id, class_name, keypoints: [[x, y, v
    or confidence], ...]}], pixels) and the image's `oks`: the mean over its labelled objects of
    each one's OKS with the prediction matched to it (0 when missed), as the validation's OKS."""
    import numpy as np
    import torch
    from pose import matched_similarities
    from ultralytics.utils.metrics import OKS_SIGMA, kpt_iou

    truth = true_keypoints(image, width, height)
    predicted = result.keypoints.data.tolist() if result.keypoints is not None else []
    classes = [int(c) for c in result.boxes.cls.tolist()]

    def named(class_id: int, points: list) -> dict[str, Any]:
        return {"class_id": class_id, "class_name": class_names[class_id],
                "keypoints": [[round(float(v), 2) for v in point] for point in points]}

    fields: dict[str, Any] = {
        "true_keypoints": [named(c, points) for c, _, points in truth],
        "predicted_keypoints": [named(c, points) for c, points in zip(classes, predicted,
                                                                      strict=False)]}
    labelled = [(c, box, points) for c, box, points in truth if any(v for *_, v in points)]
    if not labelled:
        fields["oks"] = None
        return fields
    if not predicted:
        fields["oks"] = 0.0
        return fields
    count = len(labelled[0][2])
    sigma = OKS_SIGMA if count == 17 else np.ones(count) / count  # as Ultralytics' validator
    true = torch.tensor([points for _, _, points in labelled], dtype=torch.float32)
    area = torch.tensor([(x2 - x1) * (y2 - y1) * 0.53 for _, (x1, y1, x2, y2), _ in labelled])
    oks = kpt_iou(true, torch.tensor(predicted, dtype=torch.float32), area=area, sigma=sigma)
    same_class = np.array([[c == p for p in classes] for c, _, _ in labelled])
    fields["oks"] = float(np.mean(matched_similarities(oks.numpy(), same_class)))
    return fields


def true_keypoints(image: Path, width: int, height: int) -> list[tuple[int, tuple, list]]:
    """The image's pose label as (class id, box xyxy in pixels, [[x, y, v], ...] in pixels)."""
    objects = []
    with contextlib.suppress(FileNotFoundError):
        for line in label_file(image).read_text(encoding="utf-8").splitlines():
            values = [float(v) for v in line.split()]
            if len(values) < 8 or (len(values) - 5) % 3:
                continue
            _, cx, cy, w, h = values[:5]
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                   (cy + h / 2) * height)
            points = [[x * width, y * height, v] for x, y, v in zip(
                values[5::3], values[6::3], values[7::3], strict=True)]
            objects.append((int(values[0]), box, points))
    return objects


def label_file(image: Path) -> Path:
    """The YOLO label of an image: `images/` -> `labels/`, `.txt`."""
    parts = list(image.parts)
    if "images" in parts:
        at = len(parts) - 1 - parts[::-1].index("images")
        parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def true_polygons(image: Path, width: int, height: int) -> list[tuple[int, list]]:
    """The image's segmentation label as (class id, polygon in pixels) pairs."""
    polygons = []
    with contextlib.suppress(FileNotFoundError):
        for line in label_file(image).read_text(encoding="utf-8").splitlines():
            values = [float(v) for v in line.split()]
            if len(values) > 5:
                points = [(x * width, y * height) for x, y in zip(values[1::2], values[2::2],
                                                                  strict=False)]
                polygons.append((int(values[0]), points))
    return polygons


def write_mask(path: Path, width: int, height: int, polygons: list[tuple[int, Any]]) -> Path:
    """A class-index mask image (PNG, 0 = background, class id + 1 inside each object), the
    form the UI overlays on the image; later objects are drawn over earlier ones."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for class_id, points in polygons:
        points = [(float(x), float(y)) for x, y in points]
        if len(points) >= 3:
            draw.polygon(points, fill=min(class_id + 1, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(path) as tmp:
        mask.save(tmp, format="PNG")
    return path


def true_boxes(image: Path, width: int, height: int) -> list[tuple[float, ...]]:
    """The image's YOLO label (`images/` -> `labels/`, `.txt`) as pixel boxes; a polygon
    (segmentation) gives its bounds."""
    label = label_file(image)
    boxes = []
    with contextlib.suppress(FileNotFoundError):
        for line in label.read_text(encoding="utf-8").splitlines():
            values = [float(v) for v in line.split()]
            if len(values) == 5:
                _, cx, cy, w, h = values
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            elif len(values) > 5:
                xs, ys = values[1::2], values[2::2]
                x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            else:
                continue
            boxes.append((int(values[0]), x1 * width, y1 * height, x2 * width, y2 * height))
    return boxes
