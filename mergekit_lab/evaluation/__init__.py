"""Metrics and evaluators."""

from mergekit_lab.evaluation.evaluate import evaluate, evaluate_model_on_task, predict  # noqa: F401
from mergekit_lab.evaluation.metrics import compute, list_metrics, register_metric  # noqa: F401
