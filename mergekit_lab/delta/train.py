"""The seam between ``mklab train`` and delta modules (kept here so train.py stays small)."""

from __future__ import annotations

from pathlib import Path

import torch

from mergekit_lab.delta.modules import attach_module, read_module, save_module, wrap_model
from mergekit_lab.errors import UserError


def fill_base_model(settings) -> None:
    """``--peft-init DIR`` without ``--model``: the backbone is the one the module was made for."""
    delta = settings.delta
    if delta.peft_init is None or settings.model.name_or_path:
        return
    mf = read_module(delta.peft_init)
    if not mf.base_model:
        raise UserError(f"module folder {str(delta.peft_init)!r} does not name its backbone", hint="pass --model")
    settings.model.name_or_path = mf.base_model


def prepare_model(model: torch.nn.Module, delta, *, seed: int = 42) -> torch.nn.Module:
    """Wrap ``model`` (backbone + fresh task head) with a fresh module or the one in ``--peft-init``."""
    if delta.peft_init is None:
        return wrap_model(model, delta, seed=seed)
    mf = read_module(delta.peft_init)
    if delta.peft is not None and delta.peft != mf.kind:
        raise UserError(f"--peft {delta.peft} but --peft-init {str(delta.peft_init)!r} holds a {mf.kind} module",
                        hint="drop --peft (the init folder's type is used) or pick a matching folder")
    if mf.kind not in ("lora", "prefix", "adapter"):
        raise UserError(f"--peft-init {str(delta.peft_init)!r} holds a {mf.kind} module",
                        hint="use mklab prompt-tune --init-from for prompt modules")
    # the head is loaded only if it fits this task (an ensembled module has none)
    return attach_module(model, mf, trainable=True, load_head="if_fits", seed=seed)


def save_trained(model: torch.nn.Module, directory: str | Path, *, base_model: str | None, task) -> Path:
    extra = {"num_labels": task.num_labels, "problem_type": task.problem_type, "labels": task.label_names}
    return save_module(model, directory, base_model=base_model, task=task.name, extra=extra)
