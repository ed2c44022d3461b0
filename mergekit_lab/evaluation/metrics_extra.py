"""Metrics of the task families beyond sentence classification.

- Entity-level precision / recall / F1 of tagged sequences: seqeval (``mode=None``: the
  CoNLL-eval chunking, which is what conlleval and the HF examples report).
- SQuAD exact match and F1: a faithful re-implementation of the official SQuAD v1.1 evaluation
  script (``evaluate-v1.1.py``): answers are normalised by lower-casing, removing ASCII
  punctuation (``string.punctuation``), removing the articles ``a|an|the`` as whole words and
  collapsing whitespace; EM is 1 when the normalised strings are equal; F1 is the harmonic mean
  of token precision and recall over the bag (multiset) of whitespace tokens; each prediction is
  scored against every gold answer and the maximum is taken. The official script reports
  percentages; mklab reports fractions in [0, 1] like every other metric (multiply by 100).
- MultiRC: ``f1a`` is binary F1 over all answer options, ``em`` the share of questions whose
  answer options are all labelled correctly (the SuperGLUE definitions).
- ReCoRD: max-over-gold-answers EM / token F1 with the same normalisation as SQuAD.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mergekit_lab.evaluation.metrics import register_metric

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(fn, prediction: str, ground_truths: Sequence[str]) -> float:
    return max(fn(prediction, gt) for gt in ground_truths) if ground_truths else 0.0


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 (fractions) of predictions against lists of gold answers."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = [max_over_ground_truths(squad_exact, p, a) for p, a in zip(predictions, answers)]
    f1 = [max_over_ground_truths(squad_f1, p, a) for p, a in zip(predictions, answers)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval entity precision / recall / F1 (micro over entity types) and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    return {
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)) if any(gold) else 0.0,
    }


def multirc_scores(preds: Sequence[int], labels: Sequence[int], questions: Sequence) -> dict[str, float]:
    """SuperGLUE MultiRC: F1a over all answer options, EM over questions."""
    from sklearn.metrics import f1_score

    preds, labels = np.asarray(preds), np.asarray(labels)
    f1a = float(f1_score(labels, preds, zero_division=0))
    by_q: dict = {}
    for p, y, q in zip(preds, labels, questions):
        by_q.setdefault(q, []).append(p == y)
    em = float(np.mean([all(v) for v in by_q.values()])) if by_q else 0.0
    return {"f1a": f1a, "em": em}


@register_metric("binary_f1")
def binary_f1(preds, labels, mask=None):
    """F1 of the positive class (1); predictions outside {0, 1} count as wrong."""
    from sklearn.metrics import f1_score

    return f1_score(np.asarray(labels).astype(int), np.asarray(preds).astype(int), labels=[1], average="micro",
                    zero_division=0)
