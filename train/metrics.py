"""Scores: thin wrappers over scikit-learn, so every number means what it means there."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def scores(y_true, y_pred, n_classes: int) -> dict:
    """accuracy, weighted F1 (the paper's MVSA metric), macro F1 (shows a dead class), per-class F1."""
    labels = list(range(n_classes))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": [float(x) for x in f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)],
    }


def report(y_true, y_pred, classes: list[str]) -> str:
    labels = list(range(len(classes)))
    text = classification_report(y_true, y_pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    width = max(len(c) for c in classes) + 2
    rows = ["confusion matrix (rows: true, columns: predicted)", " " * width + "".join(f"{c[:8]:>10}" for c in classes)]
    rows += [f"{c:<{width}}" + "".join(f"{v:>10}" for v in r) for c, r in zip(classes, cm)]
    return text + "\n" + "\n".join(rows) + "\n"


def shown(m: dict, n: int) -> str:
    """A `mean_std` for a person: "mean ± std"; over one seed the sample std is undefined: "± n/a"."""
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if n > 1 else f"{m['mean']:.4f} ± n/a"


def mean_std(values: list[float]) -> dict:
    """Mean and the sample standard deviation (ddof=1; 0 for a single value)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
