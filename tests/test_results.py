"""The contract's shared results: classification metrics the UI compares across trainers."""

from __future__ import annotations

import numpy as np
import pytest


def sklearn_metrics(truth: np.ndarray, predicted: np.ndarray, classes: int):
    """scikit-learn's macro averages over the classes present in `truth`, per-class values."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    present = sorted(set(truth.tolist()))
    macro = precision_recall_fscore_support(truth, predicted, labels=present, average="macro",
                                            zero_division=0)
    per_class = precision_recall_fscore_support(truth, predicted, labels=list(range(classes)),
                                                zero_division=0)
    return accuracy_score(truth, predicted), macro[:3], per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_agree_with_scikit_learn(utils_module, seed):
    rng = np.random.default_rng(seed)
    classes = 5
    truth = rng.integers(0, classes - 1, 200)  # the last class is absent from the split
    predicted = np.where(rng.random(200) < 0.6, truth, rng.integers(0, classes, 200))
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    names = [f"c{i}" for i in range(classes)]

    metrics, per_class = utils_module.classification_metrics(confusion, names, top5_correct=150)

    accuracy, (precision, recall, f1), (p, r, f, support) = sklearn_metrics(
        truth, predicted, classes)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["top5_accuracy"] == pytest.approx(150 / 200)
    assert metrics["precision"] == pytest.approx(precision)
    assert metrics["recall"] == pytest.approx(recall)
    assert metrics["f1_score"] == pytest.approx(f1)
    for i, name in enumerate(names):
        assert per_class[name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1_score": f[i], "support": int(support[i])})
    assert set(metrics) == set(utils_module.TASK_METRICS["image_classification"][1])


def test_an_empty_split_scores_zero(utils_module):
    metrics, per_class = utils_module.classification_metrics(np.zeros((2, 2)), ["a", "b"], 0)
    assert set(metrics.values()) == {0.0}
    assert per_class["a"] == {"precision": 0.0, "recall": 0.0, "f1_score": 0.0, "support": 0}
