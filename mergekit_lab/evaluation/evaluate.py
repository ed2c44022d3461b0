"""Running a model over a task split and scoring it with the task's metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mergekit_lab.runtime import progress


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, collate_fn, accelerator=None, batch_size: int = 64,
            description: str = "eval") -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Logits, labels and label masks for every example, gathered across processes in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    device = torch.device("cpu")
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader
        device = accelerator.device
    else:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            pass
    was_training = model.training
    model.eval()
    logits_all, labels_all, masks_all = [], [], []
    with progress(description, total=len(loader)) as advance:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels", None)
            mask = batch.pop("label_mask", None)
            logits = model(**batch).logits.float()
            if accelerator is not None and accelerator.num_processes > 1:
                logits = accelerator.gather_for_metrics(logits)
                labels = accelerator.gather_for_metrics(labels) if labels is not None else None
                mask = accelerator.gather_for_metrics(mask) if mask is not None else None
            logits_all.append(logits.cpu().numpy())
            if labels is not None:
                labels_all.append(labels.cpu().numpy())
            if mask is not None:
                masks_all.append(mask.cpu().numpy())
            advance()
    if was_training:
        model.train()
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return cat(logits_all), cat(labels_all), cat(masks_all)


def evaluate(model, task, dataset, collate_fn, accelerator=None, batch_size: int = 64,
             description: str = "eval") -> dict[str, Any]:
    logits, labels, mask = predict(model, dataset, collate_fn, accelerator, batch_size, description)
    return task.compute_metrics(logits, labels, mask)


def evaluate_model_on_task(model, tokenizer, task, split: str, data, *, batch_size: int = 64, accelerator=None,
                           seed: int = 42) -> dict[str, Any]:
    from mergekit_lab.data import load_task_data, make_collator

    ds = load_task_data(task, split, data, tokenizer, max_samples=data.max_eval_samples, seed=seed)
    return evaluate(model, task, ds, make_collator(tokenizer), accelerator, batch_size,
                    description=f"eval {task.name} {split}")
