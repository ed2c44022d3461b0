"""The model zoo: fine-tuned models stored under a key of what made them.

The key covers the task, the base model, the data options, the seed and every training
hyperparameter, so asking for the same training again reuses the stored model (and says so);
``retrain`` forces a new one. Merge and similarity use :func:`get_or_train` to train models
that are missing, as the RegMean repository does.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mergekit_lab.results import is_finished
from mergekit_lab.runtime import log

# settings that do not change the trained weights
_IGNORED = {"run": {"output_dir", "quiet", "debug", "overwrite", "resume", "cpu_only"},
            "training": {"logging_steps", "save_steps", "per_device_eval_batch_size"},
            "zoo": None}


def zoo_fields(settings) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    out: dict[str, Any] = {}
    for group, values in data.items():
        ignored = _IGNORED.get(group, set())
        if ignored is None or not isinstance(values, dict):
            continue
        out[group] = {k: v for k, v in values.items() if k not in ignored}
    data_fields = out.get("data")
    if data_fields is not None and data_fields.get("max_seq_length") is None and data_fields.get("task"):
        # "the task's default" and the same number given explicitly train the same model
        from mergekit_lab.data import resolve_max_seq_length
        from mergekit_lab.tasks import get_task

        data_fields["max_seq_length"] = resolve_max_seq_length(get_task(data_fields["task"]), None)
    return out


def _slug(text: str) -> str:
    text = text.rstrip("/").split("/")[-1] if text.startswith(("/", ".")) else text
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-")[:40] or "model"


def zoo_key(settings) -> str:
    fields = zoo_fields(settings)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    task = _slug(settings.data.task or "task")
    model = _slug(settings.model.name_or_path or "model")
    return f"{task}__{model}__seed{settings.run.seed}__{digest}"


def zoo_path(settings, zoo_dir: str | Path) -> Path:
    return Path(zoo_dir) / zoo_key(settings)


def get_or_train(settings, zoo_dir: str | Path, *, retrain: bool = False) -> tuple[Path, bool]:
    """Return (model folder, reused?) for these training settings, training only when needed."""
    from mergekit_lab.cli.train import train_model  # the run function of `mklab train`

    target = zoo_path(settings, zoo_dir)
    if is_finished(target) and not retrain:
        log(f"zoo: reusing {target} (same task, model, seed and hyperparameters)")
        return target, True
    child = settings.model_copy(deep=True)
    child.run.output_dir = target
    child.run.overwrite = True
    if hasattr(child, "zoo"):
        child.zoo.zoo_dir = None
    log(f"zoo: training {target.name}")
    train_model(child)
    (Path(zoo_dir) / "zoo.jsonl").open("a").write(json.dumps({"key": target.name, **zoo_fields(settings)}) + "\n")
    return target, False
