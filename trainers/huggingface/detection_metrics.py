"""Detection metrics under the contract's names (section 3), computed by COCO's evaluation.

The model's outputs are post-processed by its architecture's image processor into boxes in the
original image's pixels and scored by torchmetrics' `MeanAveragePrecision` (faster-coco-eval's
COCO evaluation, pycocotools where it is missing); nothing here computes AP by hand.

- `mAP@0.5:0.95`, `mAP@0.5` (and `mAP@0.75`): COCO's AP, averaged over the classes with ground
  truth; per class `ap_50_95` and `ap_50` (COCO's 101-point precision at IoU 0.5, averaged).
- `precision`, `recall`: as Ultralytics reports them -- at the one confidence threshold that
  maximises the F1 score averaged over the classes, each class's precision and recall at IoU 0.5,
  then their mean over the classes with ground truth. They are read from COCO's accumulated
  arrays (precision and detection score at each of its 101 recall points), so recall moves in
  steps of 0.01.
- per class `support`: ground-truth boxes of the class in the validated images.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

import utils
from detection_models import image_processor, model_type_of_outputs

TASK_TYPE = "object_detection"
PRIMARY_METRIC = "mAP@0.5:0.95"
MAX_DETECTIONS = 100  # COCO scores at most this many boxes per image (its maxDets)
SHOWN_CONFIDENCE = 0.25  # the boxes a person is shown (per-image view, predict): Ultralytics' own
CONFIDENCE_GRID = 1001  # thresholds tried for the F1-optimal operating point


def coco_backend() -> str:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    # Its INFO lines are COCO's 12-line summary table on every evaluation: the job's log (and
    # the backend's log lane) carries the metrics once, in the epoch line, instead.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    return "faster_coco_eval"


def post_process(outputs: Any, sizes: Sequence[tuple[int, int]], *, threshold: float
                 ) -> list[dict[str, Any]]:
    """Per image {scores, labels, boxes [x1, y1, x2, y2] in pixels, clipped}, at most
    MAX_DETECTIONS, best first; `sizes` the original (height, width) of each image."""
    import torch

    processor = image_processor(model_type_of_outputs(outputs))
    logits = outputs.logits.detach().float().cpu()
    raw = types.SimpleNamespace(logits=logits, pred_boxes=outputs.pred_boxes.detach().float().cpu())
    extra = {}
    if "top_k" in inspect.signature(processor.post_process_object_detection).parameters:
        extra["top_k"] = min(MAX_DETECTIONS, logits.shape[1] * logits.shape[2])
    results = processor.post_process_object_detection(
        raw, threshold=threshold, target_sizes=torch.tensor(list(sizes)), **extra)
    out = []
    for result, (height, width) in zip(results, sizes, strict=True):
        order = result["scores"].argsort(descending=True)[:MAX_DETECTIONS]
        boxes = result["boxes"][order].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        out.append({"scores": result["scores"][order], "labels": result["labels"][order].long(),
                    "boxes": boxes})
    return out


def target_boxes(target: dict[str, Any]) -> Any:
    """A target's normalised (cx, cy, w, h) as [x1, y1, x2, y2] in its original pixels."""
    from torchvision.ops import box_convert

    height, width = (int(v) for v in target["orig_size"])
    scale = target["boxes"].new_tensor([width, height, width, height])
    return box_convert(target["boxes"].detach().float().cpu() * scale.cpu(), "cxcywh", "xyxy")


@dataclasses.dataclass
class ImageResult:
    image_id: int  # the image's index in the validated split
    true_boxes: list[tuple[float, ...]]  # (class_id, x1, y1, x2, y2)
    predicted_boxes: list[tuple[float, ...]]  # (class_id, x1, y1, x2, y2, confidence)


class DetectionValidator:
    """One validation pass: `update` per batch (the collate dict and the model's output),
    `result` the POST /validation-results body. It sees the batches of one process: the
    whole split is validated where it is created (under DDP, on rank 0)."""

    def __init__(self, class_names: Sequence[str], *, keep_per_image: bool):
        from torchmetrics.detection import MeanAveragePrecision

        self.class_names = list(class_names)
        self.keep_per_image = keep_per_image
        # Process-local, like the counts beside it: a loop that validates on one rank must not
        # wait in an all-gather the other ranks never join.
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                           class_metrics=True, extended_summary=True,
                                           backend=coco_backend(), sync_on_compute=False)
        self.support = np.zeros(len(class_names), dtype=int)
        self.loss_sum, self.loss_images, self.images = 0.0, 0, 0
        self.per_image: list[ImageResult] = []

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        targets = batch["labels"]
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        predictions = post_process(outputs, sizes, threshold=0.0)
        truths = [{"boxes": target_boxes(t), "labels": t["class_labels"].detach().cpu().long()}
                  for t in targets]
        self.metric.update(predictions, truths)
        for truth in truths:
            self.support += np.bincount(truth["labels"].numpy(),
                                        minlength=len(self.class_names))[:len(self.class_names)]
        self.images += len(targets)
        if getattr(outputs, "loss", None) is not None:
            self.loss_sum += float(outputs.loss.detach()) * len(targets)
            self.loss_images += len(targets)
        if self.keep_per_image:
            for target, truth, predicted in zip(targets, truths, predictions, strict=True):
                shown = predicted["scores"] >= SHOWN_CONFIDENCE
                self.per_image.append(ImageResult(
                    int(target["image_id"]),
                    [(int(c), *b) for c, b in zip(truth["labels"].tolist(),
                                                  truth["boxes"].tolist(), strict=True)],
                    [(int(c), *b, float(s)) for c, b, s in zip(
                        predicted["labels"][shown].tolist(), predicted["boxes"][shown].tolist(),
                        predicted["scores"][shown].tolist(), strict=True)]))

    def result(self) -> utils.ValidationResult:
        summary = self.metric.compute() if self.images else {}
        curves = CocoCurves.from_summary(summary)
        values = {"mAP@0.5": _score(summary.get("map_50")),
                  "mAP@0.5:0.95": _score(summary.get("map")),
                  "mAP@0.75": _score(summary.get("map_75"))}
        with_truth = [k for k in range(len(self.class_names)) if self.support[k] > 0]
        precision, recall = curves.f1_operating_point(with_truth)
        values["precision"] = float(np.mean([precision[k] for k in with_truth])) \
            if with_truth else 0.0
        values["recall"] = float(np.mean([recall[k] for k in with_truth])) if with_truth else 0.0
        ap_50_95 = dict(zip(np.atleast_1d(summary["classes"]).tolist(),
                            np.atleast_1d(summary["map_per_class"]).tolist(),
                            strict=True)) if summary else {}
        per_class = {name: {"ap_50": curves.ap_50(k) if self.support[k] else 0.0,
                            "ap_50_95": max(float(ap_50_95.get(k, 0.0)), 0.0),
                            "precision": precision.get(k, 0.0), "recall": recall.get(k, 0.0),
                            "support": int(self.support[k])}
                     for k, name in enumerate(self.class_names)}
        return utils.ValidationResult(
            task_type=TASK_TYPE, metrics=values, primary_metric_name=PRIMARY_METRIC,
            primary_metric_value=values[PRIMARY_METRIC],
            overall_loss=self.loss_sum / self.loss_images if self.loss_images else None,
            per_class_metrics=per_class, confusion_matrix=None,
            pr_curves=curves.pr_curves(with_truth, self.class_names), class_names=self.class_names)


def _score(value: Any) -> float:
    """COCO's -1 (nothing to score) as 0."""
    return max(float(value), 0.0) if value is not None else 0.0


@dataclasses.dataclass
class CocoCurves:
    """COCO's accumulated arrays at IoU 0.5, all areas, MAX_DETECTIONS: for each class (column)
    the interpolated precision and the detection score at each of its 101 recall points."""

    precision: np.ndarray  # [recall points, columns]; -1 where the class has no ground truth
    scores: np.ndarray  # [recall points, columns]
    columns: dict[int, int]  # class id -> column
    recall_points: np.ndarray = dataclasses.field(
        default_factory=lambda: np.linspace(0.0, 1.0, 101))

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> CocoCurves:
        precision = summary.get("precision")
        if precision is None or np.ndim(precision) != 5:  # nothing validated or scored
            return cls(np.zeros((101, 0)), np.zeros((101, 0)), {})
        classes = np.atleast_1d(summary["classes"]).tolist()
        return cls(np.asarray(precision)[0, :, :, 0, -1],
                   np.asarray(summary["scores"])[0, :, :, 0, -1],
                   {int(c): j for j, c in enumerate(classes)})

    def ap_50(self, class_id: int) -> float:
        column = self.columns.get(class_id)
        if column is None:
            return 0.0
        values = self.precision[:, column]
        return float(values[values > -1].mean()) if (values > -1).any() else 0.0

    def f1_operating_point(self, class_ids: Sequence[int]
                           ) -> tuple[dict[int, float], dict[int, float]]:
        """Per class (precision, recall) at the confidence that maximises the mean F1 of
        `class_ids`: at a threshold, a class reaches the recall points whose detection
        scored at least it, with COCO's precision at the last of them."""
        ids = [k for k in class_ids if k in self.columns]
        if not ids:
            return {}, {}
        cols = [self.columns[k] for k in ids]
        precision, scores = self.precision[:, cols], self.scores[:, cols]
        thresholds = np.linspace(0.0, 1.0, CONFIDENCE_GRID)[:, None, None]
        reached = (scores[None] >= thresholds) & (precision[None] > 0)  # [grid, points, classes]
        points = precision.shape[0]
        last = points - 1 - np.argmax(reached[:, ::-1, :], axis=1)  # [grid, classes]
        found = reached.any(axis=1)
        recall = np.where(found, self.recall_points[last], 0.0)
        at = np.where(found, precision[last, np.arange(len(cols))[None, :]], 0.0)
        f1 = 2 * at * recall / np.maximum(at + recall, 1e-16)
        best = int(np.argmax(f1.mean(axis=1)))
        return ({k: float(at[best, i]) for i, k in enumerate(ids)},
                {k: float(recall[best, i]) for i, k in enumerate(ids)})

    def pr_curves(self, class_ids: Sequence[int], class_names: Sequence[str]
                  ) -> dict[str, Any] | None:
        """Precision at IoU 0.5 on COCO's recall points, per class with ground truth."""
        ids = [k for k in class_ids if k in self.columns]
        if not ids:
            return None
        return {"iou_threshold": 0.5,
                "recall": [round(float(r), 4) for r in self.recall_points],
                "precision": {class_names[k]: [round(max(float(p), 0.0), 4)
                                               for p in self.precision[:, self.columns[k]]]
                              for k in ids}}
