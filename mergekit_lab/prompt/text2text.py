"""Minimal text-to-text hook for encoder-decoder models (T5) on classification tasks.

Kept apart on purpose: the task-families work (issue 4) owns text-to-text tasks; until its
registry entries exist, ``mklab prompt-tune`` with a T5 model turns a classification task into
the T5 format here:

* source: ``"<task> <field>: <text> <field>: <text>"``, e.g. ``"rte sentence1: ... sentence2: ..."``
  (DePT's / T5's input style);
* target: the label name with ``_`` as a space (``"not entailment"``), trained with the seq2seq
  loss;
* evaluation: rank classification -- each label string is scored by its summed log-likelihood
  under the model and the best one is the prediction, so the output is always a valid label and
  the task's own metrics apply to the scores as logits. (Free generation is available through
  ``PromptTunedModel.generate``.)

Regression tasks (STS-B) are not supported by this hook.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mergekit_lab.data import resolve_max_seq_length
from mergekit_lab.errors import UserError


def label_words(task) -> list[str]:
    return [str(n).replace("_", " ") for n in task.label_names]


def source_text(task, example: dict[str, Any]) -> str:
    short = task.name.split("/")[-1].split(":")[-1]
    parts = [short]
    for f in task.text_fields:
        if example.get(f) is not None:
            parts.append(f"{f}: {example[f]}")
    return " ".join(parts)


def check_task(task) -> None:
    if task.problem_type != "single_label_classification":
        raise UserError(
            f"the T5 text-to-text hook of prompt-tune handles single-label classification, not {task.problem_type} "
            f"({task.name})",
            hint="use an encoder classifier (e.g. builtin:minilm) for this task",
        )


def encode_t2t(task, ds, tokenizer, max_seq_length: int):
    """input_ids / attention_mask of the source, ``labels`` = target ids, ``class_id`` = label index."""
    check_task(task)
    words = label_words(task)
    targets = [list(tokenizer(w)["input_ids"]) for w in words]

    def fn(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["label"])
        src = [source_text(task, {f: batch[f][i] for f in task.text_fields}) for i in range(n)]
        enc = tokenizer(src, truncation=True, max_length=max_seq_length)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [targets[int(y)] for y in batch["label"]],
            "class_id": [int(y) for y in batch["label"]],
        }

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=None)


def load_t2t_data(task, split: str, data, tokenizer, *, max_samples=None, seed: int = 42, k_shot=None):
    """Same sampling as :func:`mergekit_lab.data.load_task_data` (k-shot, then max_samples)."""
    from mergekit_lab.data import k_shot_indices, subsample

    ds = task.load(split, data.data_dir)
    if k_shot:
        ds = ds.select(k_shot_indices(ds["label"], k_shot, seed))
    ds = subsample(ds, max_samples, seed)
    return encode_t2t(task, ds, tokenizer, resolve_max_seq_length(task, data))


def make_t2t_collator(tokenizer):
    """Dynamic padding of sources; target ids padded with -100."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        t = max(len(f["labels"]) for f in features)
        return {
            "input_ids": torch.tensor(
                [list(f["input_ids"]) + [pad_id] * (n - len(f["input_ids"])) for f in features]
            ),
            "attention_mask": torch.tensor(
                [list(f["attention_mask"]) + [0] * (n - len(f["attention_mask"])) for f in features]
            ),
            "labels": torch.tensor([list(f["labels"]) + [-100] * (t - len(f["labels"])) for f in features]),
            "class_id": torch.tensor([int(f["class_id"]) for f in features]),
        }

    return collate


def t2t_compute_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


@torch.no_grad()
def label_scores(model, input_ids, attention_mask, targets: list[list[int]]) -> torch.Tensor:
    """(batch, num_labels) summed log-likelihood of every label string."""
    b = input_ids.shape[0]
    cols = []
    for ids in targets:
        labels = torch.tensor(ids, device=input_ids.device).unsqueeze(0).repeat(b, 1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits.float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        cols.append(logp.sum(dim=-1))
    return torch.stack(cols, dim=1)


@torch.no_grad()
def evaluate_t2t(model, task, dataset, collate_fn, tokenizer, accelerator=None, batch_size: int = 64) -> dict:
    """The task's metrics from rank classification over the label strings."""
    targets = [list(tokenizer(w)["input_ids"]) for w in label_words(task)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, gold = [], []
    for batch in loader:
        s = label_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), targets)
        scores.append(s.cpu().numpy())
        gold.append(batch["class_id"].numpy())
    if was_training:
        model.train()
    return task.compute_metrics(np.concatenate(scores), np.concatenate(gold))
