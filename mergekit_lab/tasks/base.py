"""The task registry.

A task name (``glue/sst2``, ``emotion/isear``, ``file:data.csv``) gives everything a command
needs: how to load each split, the text fields, the label space, the problem type, the loss
and the metrics. Families register exact names with :func:`register_task` or a name prefix
with :func:`register_task_prefix` (for names that carry a path or a domain).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mergekit_lab.errors import UserError

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation", "eval": "validation"}


def canonical_split(split: str) -> str:
    return SPLIT_ALIASES.get(split, split)


def sample_data_dir() -> Path:
    """The small real sample shipped inside the package (see mergekit_lab/data/sample/NOTICE.md)."""
    return Path(str(resources.files("mergekit_lab") / "data" / "sample"))


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        return None
    s = str(data_dir)
    if s in ("builtin:sample", "sample", "builtin:sample/"):
        return sample_data_dir()
    if s.startswith("builtin:sample/"):
        return sample_data_dir() / s[len("builtin:sample/") :]
    return Path(s).expanduser()


@dataclass
class Task:
    """A sentence(-pair) classification or regression task.

    ``load(split, data_dir)`` returns a ``datasets.Dataset`` with the text fields and ``label``
    (int, float, or a list of floats for multi-label), plus ``label_mask`` for multi-label
    tasks whose sources leave some labels unannotated.

    ``default_max_seq_length`` is the sequence length a run uses when ``--max-seq-length`` is not
    given (see :func:`mergekit_lab.data.resolve_max_seq_length`); families with longer inputs
    override it. ``supports_k_shot`` is False where "K examples per class" has no meaning
    (token classification, QA, masked LM); regression is refused by its problem type.
    """

    default_max_seq_length: ClassVar[int] = 128
    supports_k_shot: ClassVar[bool] = True

    name: str
    problem_type: str
    label_names: list[str]
    text_fields: tuple[str, ...]
    metric_names: list[str]
    loader: Callable[[Task, str, Path | None], Any] = field(repr=False, default=None)  # type: ignore[assignment]
    family: str = "classification"
    greater_is_better: bool = True
    splits: tuple[str, ...] = ("train", "validation", "test")
    description: str = ""

    def __post_init__(self) -> None:
        assert self.problem_type in PROBLEM_TYPES, self.problem_type

    # -- data -------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]

    def load(self, split: str, data_dir: str | Path | None = None):
        split = canonical_split(split)
        ds = self.loader(self, split, resolve_data_dir(data_dir))
        if len(ds) == 0:
            raise UserError(f"split {split!r} of task {self.name!r} is empty", hint="check the data files")
        return ds

    # -- model, encoding, evaluation (families override these) ---------------------------------
    def build_model(self, model_settings, *, seed: int = 42, tokenizer=None):
        """A fresh model with this task's head on the given base model."""
        from mergekit_lab.models.loading import load_model_for_task

        return load_model_for_task(model_settings, self, seed=seed, tokenizer=tokenizer)

    def load_trained(self, path: str, *, trust_remote_code: bool = False):
        """Reload a model folder trained on this task."""
        from mergekit_lab.models.loading import load_trained

        return load_trained(path, trust_remote_code=trust_remote_code)

    def check_model(self, model, name: str) -> None:
        n = getattr(model.config, "num_labels", None)
        if n is not None and n != self.num_labels:
            raise UserError(f"model {name!r} has {n} outputs but task {self.name} needs {self.num_labels}",
                            hint="evaluate each model on the task it was trained for")

    def encode(self, ds, tokenizer, max_seq_length: int):
        """Tokenised examples ready for :meth:`collator` (training) and :meth:`evaluate`.

        ``max_seq_length`` is already resolved (an int): callers use
        :func:`mergekit_lab.data.resolve_max_seq_length`."""
        from mergekit_lab.data import encode

        return encode(self, ds, tokenizer, max_seq_length)

    def collator(self, tokenizer):
        from mergekit_lab.data import make_collator

        return make_collator(tokenizer)

    def compute_loss(self, model, batch):
        """Training loss of ``model`` on a collated batch (masked BCE / MSE / CE)."""
        out = model(**{k: v for k, v in batch.items() if k not in ("labels", "label_mask")})
        return self.loss(out.logits, batch["labels"], batch.get("label_mask"))

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64,
                 description: str = "eval") -> dict[str, float]:
        """Metrics of ``model`` on an encoded split."""
        from mergekit_lab.evaluation.evaluate import predict

        logits, labels, mask = predict(model, encoded, self.collator(tokenizer), accelerator, batch_size, description)
        return self.compute_metrics(logits, labels, mask)

    # -- loss and metrics ---------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        if self.problem_type == "regression":
            return F.mse_loss(logits.view(-1), labels.float().view(-1))
        if self.problem_type == "multi_label_classification":
            per = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
            if label_mask is None:
                return per.mean()
            mask = label_mask.float()
            return (per * mask).sum() / mask.sum().clamp_min(1.0)
        return F.cross_entropy(logits, labels.long())

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        if self.problem_type == "regression":
            return logits.reshape(-1)
        if self.problem_type == "multi_label_classification":
            return (logits > 0).astype(np.int64)
        return logits.argmax(-1)

    def compute_metrics(
        self, logits: np.ndarray, labels: np.ndarray, label_mask: np.ndarray | None = None
    ) -> dict[str, float]:
        from mergekit_lab.evaluation.metrics import compute

        preds = self.predictions(np.asarray(logits))
        return {m: compute(m, preds, np.asarray(labels), label_mask) for m in self.metric_names}


# --------------------------------------------------------------------------------------------
# registry

_TASKS: dict[str, Task] = {}
_PREFIXES: dict[str, Callable[[str], Task]] = {}
_LOADED_FAMILIES = False


def register_task(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def register_task_prefix(prefix: str, factory: Callable[[str], Task], example: str = "") -> None:
    """Names starting with ``prefix`` are built by ``factory(name)`` (e.g. ``file:``)."""
    factory.example = example or f"{prefix}..."  # type: ignore[attr-defined]
    _PREFIXES[prefix] = factory


def _load_families() -> None:
    global _LOADED_FAMILIES
    if _LOADED_FAMILIES:
        return
    _LOADED_FAMILIES = True
    import importlib
    import pkgutil

    import mergekit_lab.tasks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"mergekit_lab.tasks.{mod.name}")


def list_tasks() -> list[str]:
    _load_families()
    return sorted(_TASKS) + [getattr(f, "example", p) for p, f in sorted(_PREFIXES.items())]


def get_task(name: str | None) -> Task:
    _load_families()
    if not name:
        raise UserError("no task given", hint="pass --task NAME, e.g. --task glue/sst2")
    if name in _TASKS:
        return _TASKS[name]
    for prefix, factory in sorted(_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return factory(name)
    raise UserError(f"unknown task {name!r}", hint=f"valid tasks: {', '.join(list_tasks())}")


def check_labels(task: Task, labels: list[Any], where: str) -> None:
    """Labels outside the label space are an error naming the file."""
    if task.problem_type != "single_label_classification":
        return
    n = task.num_labels
    for i, y in enumerate(labels):
        if not (isinstance(y, (int, np.integer)) and 0 <= int(y) < n):
            raise UserError(
                f"label {y!r} of example {i} in {where} is outside the label space of {task.name} "
                f"({', '.join(task.label_names)})",
                hint="fix the data file or pick the right task",
            )
