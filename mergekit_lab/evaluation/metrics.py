"""Metrics by name, computed with scikit-learn / scipy.

Each metric takes predictions (class ids, 0/1 label matrices for multi-label, or floats for
regression), references, and an optional label mask (multi-label: 1 where the label is
annotated). New metrics register with :func:`register_metric`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], float]
_METRICS: dict[str, MetricFn] = {}


def register_metric(name: str):
    def deco(fn: MetricFn) -> MetricFn:
        _METRICS[name] = fn
        return fn

    return deco


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def compute(name: str, preds: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    if name not in _METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(list_metrics())}")
    return float(_METRICS[name](np.asarray(preds), np.asarray(labels), mask))


@register_metric("accuracy")
def accuracy(preds, labels, mask=None):
    from sklearn.metrics import accuracy_score

    return accuracy_score(labels, preds)


@register_metric("f1")
def f1(preds, labels, mask=None):
    from sklearn.metrics import f1_score

    return f1_score(labels, preds, zero_division=0)


@register_metric("matthews_correlation")
def mcc(preds, labels, mask=None):
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(labels, preds)


@register_metric("pearson")
def pearson(preds, labels, mask=None):
    from scipy.stats import pearsonr

    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return pearsonr(preds.astype(np.float64), labels.astype(np.float64))[0]


@register_metric("spearman")
def spearman(preds, labels, mask=None):
    from scipy.stats import spearmanr

    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return spearmanr(preds, labels)[0]


@register_metric("macro_f1")
def macro_f1(preds, labels, mask=None):
    """Single-label: sklearn macro-F1. Multi-label: mean binary F1 over the labels present
    (annotated in the evaluation data: any unmasked example), each over its annotated examples."""
    from sklearn.metrics import f1_score

    if preds.ndim == 1:
        return f1_score(labels, preds, average="macro", zero_division=0)
    if mask is None:
        mask = np.ones_like(labels)
    scores = []
    for j in range(labels.shape[1]):
        keep = np.asarray(mask)[:, j] > 0
        if not keep.any():
            continue
        scores.append(f1_score(labels[keep, j].astype(int), preds[keep, j].astype(int), zero_division=0))
    return float(np.mean(scores)) if scores else 0.0
