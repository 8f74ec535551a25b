"""Classification metrics with the platform's names (contract section 3)."""

from __future__ import annotations

import numpy as np


def classification_metrics(confusion: np.ndarray, class_names: list[str], top5_correct: int,
                           ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics, per_class_metrics) from a confusion matrix (rows: truth, columns: prediction)."""
    confusion = confusion.astype(np.float64)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    present = support > 0  # macro averages over the classes this split contains
    metrics = {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "top5_accuracy": float(top5_correct / total) if total else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1_score": float(f1[present].mean()) if present.any() else 0.0,
    }
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "f1_score": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return metrics, per_class
