"""Turning a task's split into model inputs: sampling, tokenisation and collation."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lab.errors import UserError


def k_shot_indices(labels: Sequence[Any], k: int, seed: int) -> list[int]:
    """K examples per class, chosen with ``seed``; balanced and reproducible.

    Classes with fewer than K examples contribute all of theirs. The result is shuffled with the
    same seed so classes are interleaved. Regression labels are not supported (no classes).
    """
    by_class: dict[Any, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        key = tuple(y) if isinstance(y, (list, tuple)) else y
        if isinstance(key, float):
            raise UserError("k-shot sampling needs class labels, not regression scores")
        by_class[key].append(i)
    rng = random.Random(seed)
    picked: list[int] = []
    for key in sorted(by_class, key=repr):
        idx = by_class[key]
        picked.extend(rng.sample(idx, min(k, len(idx))))
    rng.shuffle(picked)
    return picked


def resolve_max_seq_length(task, data: Any = None) -> int:
    """The sequence length a run uses for ``task``: the explicit ``--max-seq-length`` when given,
    else the task's ``default_max_seq_length`` (128; 384 for extractive QA windows).

    ``data`` is a settings group with a ``max_seq_length`` attribute (``DataSettings``), a plain
    int, or None. This is the one place a missing value becomes a number.
    """
    value = getattr(data, "max_seq_length", data)
    if value is None:
        return int(getattr(task, "default_max_seq_length", 128))
    return int(value)


def check_k_shot(task, k_shot: int | None) -> None:
    """``--k-shot`` only makes sense where each example has one class label."""
    if not k_shot:
        return
    if not getattr(task, "supports_k_shot", True) or getattr(task, "problem_type", None) == "regression":
        what = ("has regression scores" if task.problem_type == "regression"
                else f"is a {task.family.replace('_', ' ')} task")
        raise UserError(f"--k-shot {k_shot} needs one class label per example, but {task.name} {what}",
                        hint="use --max-train-samples N to train on fewer examples")


def subsample(ds, max_samples: int | None, seed: int):
    """The first ``max_samples`` examples of a seeded shuffle (same subset for the same seed)."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(max_samples))


def encode(task, ds, tokenizer, max_seq_length: int):
    """Tokenise a task's dataset: input_ids, attention_mask (token_type_ids), labels[, label_mask]."""
    fields = task.text_fields

    def fn(batch: dict[str, list]) -> dict[str, list]:
        args = [batch[f] for f in fields[:2]]
        enc = tokenizer(*args, truncation=True, max_length=max_seq_length)
        out = dict(enc)
        out["labels"] = batch["label"]
        if "label_mask" in batch:
            out["label_mask"] = batch["label_mask"]
        return out

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=None)


def load_task_data(task, split: str, data, tokenizer, *, max_samples: int | None = None, seed: int = 42,
                   k_shot: int | None = None):
    """Load, sample (k-shot or max_samples, seeded) and tokenise one split of a task."""
    check_k_shot(task, k_shot)
    ds = task.load(split, data.data_dir)
    if k_shot:
        ds = ds.select(k_shot_indices(ds["label"], k_shot, seed))
    ds = subsample(ds, max_samples, seed)
    return task.encode(ds, tokenizer, resolve_max_seq_length(task, data))


def make_collator(tokenizer):
    """Dynamic padding to the longest sequence in the batch; labels and masks stacked as tensors."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    padding_side = getattr(tokenizer, "padding_side", "right")

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in features[0]:
                continue
            fill = pad_id if key == "input_ids" else 0
            rows = []
            for f in features:
                seq = list(f[key])
                pad = [fill] * (n - len(seq))
                rows.append(pad + seq if padding_side == "left" else seq + pad)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            dtype = torch.float32 if isinstance(labels[0], (float, list)) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        if "label_mask" in features[0]:
            batch["label_mask"] = torch.tensor([f["label_mask"] for f in features], dtype=torch.float32)
        return batch

    return collate
