"""Evaluating a saved module folder on a backbone (``mklab eval --adapter DIR``).

Any module folder: LoRA, prefix, bottleneck adapter (this package) and PT / DePT
(:mod:`mergekit_lab.prompt`, which also handles text-to-text T5). The backbone is ``--model``
or, when not given, the one the folder names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_lab.delta.modules import attach_module, read_module
from mergekit_lab.errors import UserError


def evaluate_module_folder(settings, tasks, accelerator=None) -> list[dict[str, Any]]:
    """Rows (model, kind, task, split, metrics, examples) for ``settings.eval.adapter`` on each task/split."""
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.settings import ModelSettings
    from mergekit_lab.tasks import canonical_split

    folder = Path(settings.eval.adapter)
    mf = read_module(folder)
    names = list(settings.model.name_or_path or [])
    if len(names) > 1:
        raise UserError("--adapter evaluates one module on one backbone", hint="pass a single --model")
    base = names[0] if names else mf.base_model
    if not base:
        raise UserError(f"module folder {str(folder)!r} does not name its backbone", hint="pass --model BASE")
    ms = ModelSettings(name_or_path=base, tokenizer=settings.model.tokenizer, revision=settings.model.revision,
                       trust_remote_code=settings.model.trust_remote_code)
    bs = settings.eval.per_device_eval_batch_size
    rows = []
    for task in tasks:
        for split in settings.eval.split:
            split = canonical_split(split)
            if mf.kind in ("pt", "dept"):
                from mergekit_lab.prompt.run import evaluate_prompt_adapter

                metrics = evaluate_prompt_adapter(ms, folder, task.name, split, settings.data, batch_size=bs,
                                                  accelerator=accelerator, seed=settings.run.seed)
                n = None
            else:
                if mf.task and mf.task != task.name:
                    from mergekit_lab.runtime import log

                    log(f"note: module {folder.name} was trained on {mf.task}, evaluating on {task.name}")
                tok = load_tokenizer(ms)
                model = task.build_model(ms, seed=settings.run.seed, tokenizer=tok)
                model = attach_module(model, mf, load_head=True)
                if accelerator is not None:
                    model = model.to(accelerator.device)
                ds = load_task_data(task, split, settings.data, tok, max_samples=settings.data.max_eval_samples,
                                    seed=settings.run.seed)
                metrics = task.evaluate(model, ds, tok, accelerator=accelerator, batch_size=bs,
                                        description=f"eval {folder.name} {task.name} {split}")
                n = len(ds)
            rows.append({"model": str(folder), "kind": f"module:{mf.kind}", "task": task.name, "split": split,
                         "metrics": metrics, "examples": n, "base_model": base})
    return rows
