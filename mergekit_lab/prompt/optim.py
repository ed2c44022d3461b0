"""Optimizer parameter groups with DePT's two learning rates.

Groups (empty ones are left out): ``prompt`` (the prompt learning rate), ``lora_embedding``
(A and B, the low-rank learning rate) and, for classifiers, ``head`` and ``head_no_decay``
(biases and norms). Weight decay is set on every group except ``head_no_decay``, so AdamW
really applies it to the prompt and to A, B.
"""

from __future__ import annotations

from mergekit_lab.prompt.model import PromptTunedModel


def param_groups(
    model: PromptTunedModel,
    *,
    prompt_lr: float,
    lora_lr: float | None = None,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW`` (each carries a ``name``).

    ``lora_lr`` defaults to ``prompt_lr``; ``head_lr`` defaults to ``lora_lr`` (the prompt's
    large learning rate, e.g. 0.3, would wreck a linear head)."""
    lora_lr = prompt_lr if lora_lr is None else lora_lr
    head_lr = lora_lr if head_lr is None else head_lr
    groups = [{"name": "prompt", "params": [model.prompt], "lr": prompt_lr, "weight_decay": weight_decay}]
    if model.is_dept:
        groups.append(
            {
                "name": "lora_embedding",
                "params": [model.lora_embedding_A, model.lora_embedding_B],
                "lr": lora_lr,
                "weight_decay": weight_decay,
            }
        )
    decay, no_decay = [], []
    for _name, p in model.head_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    if decay:
        groups.append({"name": "head", "params": decay, "lr": head_lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"name": "head_no_decay", "params": no_decay, "lr": head_lr, "weight_decay": 0.0})
    return groups
