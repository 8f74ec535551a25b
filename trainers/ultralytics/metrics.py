"""Ultralytics' metrics under the platform's names (contract section 3).

The platform's UI reads `mAP@0.5`, `mAP@0.5:0.95`, `precision`, `recall` and per class
`{ap_50, ap_50_95, precision, recall, support}` for detection and segmentation, and `accuracy`,
`precision`, `recall`, `f1_score`, `top5_accuracy` and per class `{precision, recall, f1_score,
support}` for classification -- never Ultralytics' raw keys like `metrics/mAP50(B)`.

Segmentation and pose send the box metrics under those names and the task's own beside them,
as the UI shows them side by side: masks under `mAP50(M)`, `mAP50-95(M)`, `precision(M)`,
`recall(M)` (per class `ap_50(M)`, `ap_50_95(M)`, `precision(M)`, `recall(M)`), keypoints under
the same names with `(P)`, plus `OKS` (pose.py); the primary metric is the task's own
(`mAP50-95(M)`, `mAP50-95(P)`). Confusion matrices are lists of int rows, rows = true
class, columns = predicted class; detection adds a last row and column for "background" (missed
objects and false detections), as Ultralytics counts them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import utils
from model import TASK_TYPES

# The metric that picks best.pt, per Ultralytics task: (platform name, Ultralytics key).
PRIMARY = {
    "detect": ("mAP@0.5:0.95", "metrics/mAP50-95(B)"),
    "segment": ("mAP50-95(M)", "metrics/mAP50-95(M)"),
    "pose": ("mAP50-95(P)", "metrics/mAP50-95(P)"),
    "classify": ("accuracy", "metrics/accuracy_top1"),
}
# The task's own metrics beside the box ones: (Ultralytics' attribute, the platform's suffix).
OWN_METRICS = {"segment": ("seg", "(M)"), "pose": ("pose", "(P)")}
CURVE_POINTS = 101  # PR curves are sent on a 0..1 recall grid of this many points


def primary_value(task: str, results: dict[str, Any]) -> float:
    """The primary metric from Ultralytics' results dict (`trainer.metrics`)."""
    return float(results.get(PRIMARY[task][1], 0.0))


def training_metrics(trainer: Any) -> utils.TrainingMetrics:
    """Loss, its components, learning rate and throughput of the epoch that just ended."""
    losses = {key.split("/", 1)[-1]: float(value) for key, value in
              trainer.label_loss_items(trainer.tloss, prefix="train").items()}
    extra: dict[str, Any] = dict(losses)
    learning_rates = trainer.lr or {}
    for key, value in learning_rates.items():  # lr/pg0: weights, pg1: norms, pg2: biases
        extra[key.replace("lr/", "lr_")] = float(value)
    images = len(getattr(trainer.train_loader, "dataset", ()))
    if images and trainer.epoch_time:
        extra["throughput_img_s"] = round(images / trainer.epoch_time, 1)
    return utils.TrainingMetrics(loss=sum(losses.values()) if losses else None,
                                 learning_rate=learning_rates.get("lr/pg0"), extra_metrics=extra)


def validation_loss(results: dict[str, Any]) -> float | None:
    losses = [float(v) for k, v in results.items() if k.startswith("val/")]
    return sum(losses) if losses else None


def validation_result(task: str, metrics: Any, class_names: list[str],
                      loss: float | None = None) -> utils.ValidationResult:
    """A ValidationResult from Ultralytics' DetMetrics, SegmentMetrics, PoseMetrics or
    ClassifyMetrics."""
    if task == "classify":
        values, per_class, confusion = classification(metrics, class_names)
        curves = None
    else:
        values, per_class = detection(task, metrics, class_names)
        confusion = confusion_rows(metrics)
        own = OWN_METRICS.get(task)
        curves = pr_curves(getattr(metrics, own[0]) if own else metrics.box, class_names)
    name = PRIMARY[task][0]
    return utils.ValidationResult(
        task_type=TASK_TYPES[task],
        metrics=values, primary_metric_name=name, primary_metric_value=values[name],
        overall_loss=loss, per_class_metrics=per_class, confusion_matrix=confusion,
        pr_curves=curves, class_names=list(class_names))


def summary(metric: Any, suffix: str = "") -> dict[str, float]:
    if suffix:  # the names the UI reads for masks and keypoints: mAP50(M), mAP50-95(M), ...
        return {f"mAP50{suffix}": float(metric.map50), f"mAP50-95{suffix}": float(metric.map),
                f"precision{suffix}": float(metric.mp), f"recall{suffix}": float(metric.mr)}
    return {"mAP@0.5": float(metric.map50), "mAP@0.5:0.95": float(metric.map),
            "precision": float(metric.mp), "recall": float(metric.mr)}


def detection(task: str, metrics: Any, class_names: list[str],
              ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Box metrics under the contract's names; for segmentation and pose, the masks' or the
    keypoints' beside them with their suffix (and OKS for pose)."""
    parts = [(metrics.box, "")]
    if task in OWN_METRICS:
        attribute, suffix = OWN_METRICS[task]
        parts.append((getattr(metrics, attribute), suffix))
    values: dict[str, float] = {}
    for metric, suffix in parts:
        values.update(summary(metric, suffix))
    if task == "pose":
        values["OKS"] = float(getattr(metrics, "oks", 0.0))
    support = metrics.nt_per_class if metrics.nt_per_class is not None else ()
    per_class: dict[str, dict[str, float]] = {}
    for i, name in enumerate(class_names):
        per_class[name] = {}
        for _, suffix in parts:
            per_class[name].update({f"ap_50{suffix}": 0.0, f"ap_50_95{suffix}": 0.0,
                                    f"precision{suffix}": 0.0, f"recall{suffix}": 0.0})
        per_class[name]["support"] = int(support[i]) if i < len(support) else 0
    for metric, suffix in parts:
        for row, class_id in enumerate(metric.ap_class_index):
            per_class[class_names[int(class_id)]].update({
                f"ap_50{suffix}": float(metric.ap50[row]),
                f"ap_50_95{suffix}": float(metric.ap[row]),
                f"precision{suffix}": float(metric.p[row]),
                f"recall{suffix}": float(metric.r[row])})
    return values, per_class


def confusion_rows(metrics: Any) -> list[list[int]] | None:
    """Ultralytics' matrix (rows: predicted, columns: true) as rows = true class; None when
    Ultralytics did not count one (detection: only when it plots, i.e. the final validation and
    evaluation, not the epochs in between)."""
    matrix = getattr(getattr(metrics, "confusion_matrix", None), "matrix", None)
    if matrix is None or not np.asarray(matrix).any():
        return None
    return np.rint(np.asarray(matrix).T).astype(int).tolist()


def pr_curves(metric: Any, class_names: list[str]) -> dict[str, Any] | None:
    """Precision at IoU 0.5 on a recall grid, per class (the data behind the PR plot)."""
    recall = np.asarray(getattr(metric, "px", []))
    precision = np.asarray(getattr(metric, "prec_values", []))
    if recall.size == 0 or precision.ndim != 2 or not len(precision):
        return None
    index = np.linspace(0, recall.size - 1, CURVE_POINTS).round().astype(int)
    return {"iou_threshold": 0.5, "recall": [round(float(r), 4) for r in recall[index]],
            "precision": {class_names[int(c)]: [round(float(p), 4) for p in precision[row][index]]
                          for row, c in enumerate(metric.ap_class_index)}}


def classification(metrics: Any, class_names: list[str]) -> tuple[
        dict[str, float], dict[str, dict[str, float]], list[list[int]] | None]:
    """The contract's classification metrics (utils.classification_metrics) from Ultralytics'
    confusion matrix and top-5 accuracy; without a matrix, only top-1 and top-5 accuracy."""
    confusion = confusion_rows(metrics)
    if confusion is None:
        values = {"accuracy": float(metrics.top1), "top5_accuracy": float(metrics.top5),
                  "precision": 0.0, "recall": 0.0, "f1_score": 0.0}
        return values, {name: {"precision": 0.0, "recall": 0.0, "f1_score": 0.0, "support": 0}
                        for name in class_names}, None
    images = int(np.asarray(confusion).sum())
    values, per_class = utils.classification_metrics(
        confusion, class_names, top5_correct=round(float(metrics.top5) * images))
    return values, per_class, confusion
