"""The evaluation report files: results JSON, a per-class CSV and a confusion-matrix image."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import utils

RESULTS_NAME = "results.json"
PER_CLASS_NAME = "per_class_report.csv"
CONFUSION_NAME = "confusion_matrix.png"


def write_report(out_dir: Path, result: utils.ValidationResult,
                 about: dict[str, Any]) -> list[Path]:
    """The three files, each written atomically; `about` (split, checkpoint, ...) goes first in
    the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_NAME
    with utils.atomic_path(results) as tmp:
        tmp.write_text(json.dumps({
            **about, "task_type": result.task_type, "metrics": result.metrics,
            "loss": result.overall_loss, "primary_metric_name": result.primary_metric_name,
            "primary_metric_value": result.primary_metric_value,
            "per_class_metrics": result.per_class_metrics,
            "confusion_matrix": result.confusion_matrix, "class_names": result.class_names,
        }, indent=2, ensure_ascii=False), encoding="utf-8")
    per_class = out_dir / PER_CLASS_NAME
    with utils.atomic_path(per_class) as tmp, open(tmp, "w", newline="",
                                                   encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class_id", "class_name", "precision", "recall", "f1_score", "support"])
        for i, name in enumerate(result.class_names):
            row = (result.per_class_metrics or {})[name]
            writer.writerow([i, name, f"{row['precision']:.6f}", f"{row['recall']:.6f}",
                             f"{row['f1_score']:.6f}", row["support"]])
    confusion = out_dir / CONFUSION_NAME
    plot_confusion_matrix(result.confusion_matrix or [], result.class_names, confusion,
                          title=f"accuracy {result.metrics['accuracy']:.3f}")
    return [results, per_class, confusion]


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, *,
                          title: str = "") -> Path:
    """Rows: true class, columns: predicted class; counts written in when they fit."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a job; chosen before pyplot is imported
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64).reshape(len(class_names), len(class_names))
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2), 40.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    try:
        image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if n <= 60:
            ax.set_xticks(range(n), labels=class_names, rotation=90)
            ax.set_yticks(range(n), labels=class_names)
        if n <= 25:
            threshold = counts.max() / 2 if counts.size else 0
            for (row, col), value in np.ndenumerate(counts):
                ax.text(col, row, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > threshold else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        fig.tight_layout()
        with utils.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
