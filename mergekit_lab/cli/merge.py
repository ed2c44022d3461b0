"""`mklab merge`: merge fine-tuned models (RegMean, Fisher, averaging, task arithmetic, TIES,
DARE, SLERP) and compare them with the individual models, their ensemble and multi-task
learning, in-domain and out-of-domain. The work is done by
:func:`mergekit_lab.merging.experiment.run_merge_experiment`.

Outputs in ``--output-dir``: ``merged/<models>/<method>/`` (one loadable model folder, or one
per task with ``--heads keep``: ``merged/<models>/<method>/<model name>/``), results.json with
one row per (model, task, split), and a table on screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import Field, field_validator

from mergekit_lab.cli.train import ZooSettings
from mergekit_lab.errors import UserError
from mergekit_lab.settings import CommandSettings, RunSettings, Section, TrainingSettings


class ModelSpec(Section):
    """A model given by task: trained on demand from the base model through the zoo."""

    task: str = Field(description="Task the model is fine-tuned on.")
    seed: int | None = Field(None, description="Training seed (default: run.seed).")
    data_dir: str | None = Field(None, description="Data folder for this model's task (default: data.data_dir).")
    partition: int | None = Field(None, ge=0, description="Train on this non-IID partition of the task (see --partitions).")
    max_train_samples: int | None = Field(None, gt=0, description="Training examples for this model (default: data.max_train_samples).")
    num_train_epochs: float | None = Field(None, gt=0, description="Epochs for this model (default: training.num_train_epochs).")


class MergeModelSettings(Section):
    models: list[str] = Field(
        default_factory=list,
        description="Models to merge: fine-tuned folders, or aliases from model_specs (trained on demand).",
        json_schema_extra={"flag": "--models"},
    )
    model_tasks: list[str] = Field(
        default_factory=list, description="Task of each model folder, in order (default: read from its results.json)."
    )
    model_specs: dict[str, ModelSpec] = Field(
        default_factory=dict, description="Aliases trained through the zoo: {alias: {task, seed, data_dir, partition}}."
    )
    filter_model: list[str] = Field(default_factory=list, description="Use only these of the models (names/aliases).")
    base_model: str | None = Field(
        None, description="Pretrained model: trains aliased models; the base of task_arithmetic/ties/dare."
    )


class MergeDataSettings(Section):
    eval_tasks: list[str] = Field(default_factory=list, description="Tasks to evaluate on (default: the models' tasks).")
    data_dir: str | None = Field(None, description="Data folder (GLUE layout, emotion JSONL, builtin:sample).")
    eval_splits: list[str] = Field(default_factory=lambda: ["validation"], description="Evaluation split(s).")
    max_seq_length: int | None = Field(None, gt=0, description="Truncate inputs to this many tokens (default: the task's own, e.g. 128).")
    max_train_samples: int | None = Field(None, gt=0, description="Training examples per model trained on demand.")
    max_eval_samples: int | None = Field(None, gt=0, description="Evaluate on at most this many examples.")
    partitions: int | None = Field(None, ge=2, description="Split a task's training set into N non-IID partitions.")
    partition_size: int = Field(2000, gt=0, description="Examples per non-IID partition.")
    partition_share: float = Field(0.8, gt=0, le=1, description="Share of a partition drawn from its one major label.")


class MergeOptions(Section):
    method: list[str] = Field(
        default_factory=lambda: ["regmean"],
        description="Merge method(s): average, fisher, regmean, task_arithmetic, ties, dare, slerp.",
    )
    method_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Method parameters, e.g. '{alpha: 0.1}' or per method '{regmean: {alpha: 0.1}, ties: {density: 0.3}}'.",
    )
    heads: Literal["merge", "keep"] = Field(
        "merge", description="merge: one model (same label space); keep: each task keeps its own head."
    )
    strategy: Literal["all", "pairwise", "greedy"] = Field("all", description="Which model sets to merge.")
    greedy_order: Literal["given", "ood"] = Field("given", description="Greedy order: as given, or by OOD score.")
    weights: Path | None = Field(None, description="JSON file of per-model weights (list, or model -> weight).")
    baselines: list[Literal["individual", "ensemble", "multitask"]] = Field(
        default_factory=list, description="Baselines in the same table: individual ensemble multitask."
    )
    max_shard_size: str = Field("2GB", description="Largest output safetensors shard.")
    save_models: bool = Field(True, description="Keep the merged model folders (off: evaluate and delete).")

    @field_validator("method")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        from mergekit_lab.merging import list_methods

        known = list_methods()
        for m in v:
            if m not in known:
                raise ValueError(f"unknown merge method {m!r}; choose from {', '.join(known)}")
        if not v:
            raise ValueError("give at least one merge method")
        return v


class StatsSettings(Section):
    stats_examples: int = Field(1000, gt=0, description="Training examples per model for Grams / Fisher.")
    stats_batch_size: int = Field(16, gt=0, description="Batch size while collecting statistics.")
    gram_dtype: Literal["float64", "float32"] = Field("float64", description="Accumulation dtype of Gram matrices.")
    fisher_per_example: bool = Field(False, description="Per-example Fisher (slower) instead of per-batch.")
    stats_dir: Path | None = Field(None, description="Store statistics here instead of next to each model.")
    recompute_stats: bool = Field(False, description="Recompute statistics even when stored ones match.")


class MergeSettings(CommandSettings):
    run: RunSettings = RunSettings()
    model: MergeModelSettings = MergeModelSettings()
    data: MergeDataSettings = MergeDataSettings()
    merge: MergeOptions = MergeOptions()
    stats: StatsSettings = StatsSettings()
    training: TrainingSettings = TrainingSettings()
    zoo: ZooSettings = ZooSettings()


def print_merge_table(rows: list[dict], summary: dict[str, Any], title: str = "mklab merge") -> None:
    """One line per model (individual / ensemble / multitask / merged), one column per task
    (primary metric, first split), and the in-domain and OOD means."""
    from rich.console import Console
    from rich.table import Table

    from mergekit_lab.tasks import get_task

    tasks: list[str] = []
    split0 = rows[0]["split"] if rows else "validation"
    for r in rows:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    table = Table(title=title)
    table.add_column("model")
    table.add_column("kind")
    for t in tasks:
        table.add_column(f"{t}\n{get_task(t).primary_metric}", justify="right")
    table.add_column("mean\nin-domain", justify="right")
    table.add_column("mean\nOOD", justify="right")
    order: list[str] = []
    for r in rows:
        if r["model"] not in order:
            order.append(r["model"])
    for name in order:
        cells = []
        for t in tasks:
            r = next((x for x in rows if x["model"] == name and x["task"] == t and x["split"] == split0), None)
            v = r["metrics"].get(get_task(t).primary_metric) if r else None
            cells.append(f"{v:.4f}" if isinstance(v, (int, float)) else "")
        s = summary.get(name, {})
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else ""  # noqa: E731
        kind = next(x["kind"] for x in rows if x["model"] == name)
        table.add_row(name, kind, *cells, fmt(s.get("mean_in_domain")), fmt(s.get("mean_ood")))
    Console().print(table)


def run_merge(settings: MergeSettings) -> dict:
    from mergekit_lab.merging import task_variants  # noqa: F401  (registers noniid:/union: tasks)
    from mergekit_lab.merging.experiment import run_merge_experiment
    from mergekit_lab.results import RunOutput
    from mergekit_lab.runtime import log, set_quiet

    set_quiet(settings.run.quiet)
    if settings.run.output_dir is None:
        raise UserError("no output folder given", hint="pass --output-dir DIR")
    if not settings.model.models:
        raise UserError("no models given", hint="pass --models DIR DIR ... (or a preset with model_specs)")
    with RunOutput(settings.run.output_dir, "merge", settings, overwrite=settings.run.overwrite) as out:
        from mergekit_lab.similarity.ensemble import is_module_pool, run_module_merge

        modules = is_module_pool(settings.model.models)  # PEFT module folders: weighted module ensembling
        res = run_module_merge(settings, out.tmp_dir) if modules else run_merge_experiment(settings, out.tmp_dir)
        out.rows = res["rows"]
        out.metrics = res["metrics"]
        out.extra = res["extra"]
        out.artifacts = {"module": "."} if modules else {"merged": "merged"}
        data = out.results()
    # the merged folders moved with the rename: fix the paths in the merge reports' view
    if not settings.run.quiet:
        print_merge_table(res["rows"], res["metrics"], title=f"mklab merge ({', '.join(settings.merge.method)})")
    log(f"results -> {Path(settings.run.output_dir) / 'results.json'}")
    return data


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command
    from mergekit_lab.merging import method_help

    help_text = (
        "Merge fine-tuned models (RegMean, Fisher, average, task arithmetic, TIES, DARE, SLERP), streaming; "
        "compare with individual models, their ensemble and multi-task learning.\n\n"
        "Methods and parameters (--method, --method-params):\n\n" + method_help().replace("\n", "\n\n")
    )
    register_command(app, "merge", MergeSettings, run_merge, help=help_text)
