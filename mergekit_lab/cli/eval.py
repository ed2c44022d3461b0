"""`mklab eval`: evaluate model folders on tasks and splits; a rich table and results.json."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import Field

from mergekit_lab.errors import UserError
from mergekit_lab.settings import CommandSettings, DataSettings, ModelSettings, RunSettings, Section


class EvalModelSettings(ModelSettings):
    name_or_path: list[str] = Field(  # type: ignore[assignment]
        default_factory=list, description="Model folder(s) to evaluate (several allowed).",
        json_schema_extra={"flag": "--model"},
    )


class EvalDataSettings(DataSettings):
    task: list[str] = Field(  # type: ignore[assignment]
        default_factory=list, description="Task(s) to evaluate on, e.g. glue/sst2 (several allowed).",
        json_schema_extra={"flag": "--task"},
    )


class EvalOptions(Section):
    split: list[str] = Field(default_factory=lambda: ["validation"], description="Split(s): validation, test, train.")
    per_device_eval_batch_size: int = Field(64, gt=0, description="Evaluation batch size.")
    adapter: Path | None = Field(None, description="A module folder (LoRA, prefix, adapter, PT, DePT) to put on --model "
                                                   "(default: the backbone the folder names).")


class EvalSettings(CommandSettings):
    run: RunSettings = RunSettings()
    model: EvalModelSettings = EvalModelSettings()
    data: EvalDataSettings = EvalDataSettings()
    eval: EvalOptions = EvalOptions()


def print_rows(rows: list[dict], title: str = "results") -> None:
    """A rich table of result rows (model, task, split, metrics) on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    metric_names: list[str] = []
    for r in rows:
        for m in r.get("metrics", {}):
            if m not in metric_names:
                metric_names.append(m)
    for col in ("model", "task", "split", *metric_names):
        table.add_column(col, justify="right" if col in metric_names else "left")
    for r in rows:
        vals = [f"{r['metrics'][m]:.4f}" if isinstance(r["metrics"].get(m), (int, float)) else "" for m in metric_names]
        table.add_row(str(r.get("model", "")), str(r.get("task", "")), str(r.get("split", "")), *vals)
    Console().print(table)


def run_eval(settings: EvalSettings) -> dict:
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer, resolve_model_ref
    from mergekit_lab.results import RunOutput
    from mergekit_lab.runtime import make_accelerator
    from mergekit_lab.tasks import canonical_split, get_task

    run, data = settings.run, settings.data
    if not settings.model.name_or_path and not settings.eval.adapter:
        raise UserError("no model given", hint="pass --model DIR (several allowed)")
    if not data.task:
        raise UserError("no task given", hint="pass --task NAME (several allowed), e.g. --task glue/sst2")
    tasks = [get_task(t) for t in data.task]
    refs = [] if settings.eval.adapter else [resolve_model_ref(m) for m in settings.model.name_or_path]
    acc = make_accelerator(run)
    rows = []
    loaded = []
    if settings.eval.adapter:  # PEFT seam: one module folder on its backbone
        from mergekit_lab.delta.evaluate import evaluate_module_folder

        rows = evaluate_module_folder(settings, tasks, acc)
    for name, ref in zip(settings.model.name_or_path, refs):
        tok = load_tokenizer(ModelSettings(name_or_path=ref, tokenizer=settings.model.tokenizer,
                                           revision=settings.model.revision,
                                           trust_remote_code=settings.model.trust_remote_code))
        loaded.append((name, ref, tok))
    for name, ref, tok in loaded:
        models: dict[type, object] = {}  # one load per task family (each family has its model class)
        for task in tasks:
            if type(task) not in models:
                models[type(task)] = task.load_trained(ref, trust_remote_code=settings.model.trust_remote_code).to(acc.device)
            model = models[type(task)]
            task.check_model(model, name)
            for split in settings.eval.split:
                split = canonical_split(split)
                ds = load_task_data(task, split, data, tok, max_samples=data.max_eval_samples, seed=run.seed)
                metrics = task.evaluate(model, ds, tok, accelerator=acc, batch_size=settings.eval.per_device_eval_batch_size,
                                        description=f"eval {Path(name).name} {task.name} {split}")
                rows.append({"model": name, "kind": "model", "task": task.name, "split": split,
                             "metrics": metrics, "examples": len(ds)})
    if run.output_dir is not None:
        with RunOutput(run.output_dir, "eval", settings, overwrite=run.overwrite, accelerator=acc) as out:
            out.rows = rows
            out.metrics = {f"{r['model']}|{r['task']}|{r['split']}": r["metrics"] for r in rows}
    if acc.is_main_process and not run.quiet:
        print_rows(rows, "mklab eval")
    return {"rows": rows}


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command

    register_command(app, "eval", EvalSettings, run_eval,
                     help="Evaluate one or more model folders on one or more tasks and splits.")
