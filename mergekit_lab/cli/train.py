"""`mklab train`: fine-tune a model on a task (the shared loop), save it and results.json."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer
from pydantic import Field

from mergekit_lab.delta.settings import DeltaSettings
from mergekit_lab.errors import UserError
from mergekit_lab.settings import (
    CommandSettings,
    DataSettings,
    ModelSettings,
    RunSettings,
    Section,
    TrainingSettings,
)


class ZooSettings(Section):
    zoo_dir: Path | None = Field(None, description="Store/reuse trained models in this zoo folder.")
    retrain: bool = Field(False, description="Train even if the zoo has a matching model.")


class TrainSettings(CommandSettings):
    run: RunSettings = RunSettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()
    delta: DeltaSettings = DeltaSettings()
    zoo: ZooSettings = ZooSettings()


def _link_copy(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def train_model(settings: TrainSettings) -> dict:
    """Fine-tune ``settings.model`` on ``settings.data.task``; returns the results dict."""
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.results import RunOutput
    from mergekit_lab.runtime import log, make_accelerator, seed_everything, set_quiet
    from mergekit_lab.tasks import get_task
    from mergekit_lab.training import fit

    run, data, training = settings.run, settings.data, settings.training
    set_quiet(run.quiet)
    if run.output_dir is None:
        raise UserError("no output folder given", hint="pass --output-dir DIR")
    task = get_task(data.task)
    if settings.delta.active:  # PEFT seam: the backbone of --peft-init when --model is not given
        from mergekit_lab.delta.train import fill_base_model

        settings = settings.model_copy(deep=True)
        fill_base_model(settings)
    acc = make_accelerator(run, training.gradient_accumulation_steps)
    seed_everything(run.seed)
    tokenizer = load_tokenizer(settings.model)
    train_ds = load_task_data(task, "train", data, tokenizer, max_samples=data.max_train_samples, seed=run.seed,
                              k_shot=data.k_shot)
    eval_ds = load_task_data(task, "validation", data, tokenizer, max_samples=data.max_eval_samples, seed=run.seed)
    model = task.build_model(settings.model, seed=run.seed, tokenizer=tokenizer)
    if settings.delta.active:  # PEFT seam: frozen backbone + LoRA / prefix / adapter (or --peft-init)
        from mergekit_lab.delta.train import prepare_model

        model = prepare_model(model, settings.delta, seed=run.seed)
    collate = task.collator(tokenizer)
    log(f"train {task.name}: {len(train_ds)} train / {len(eval_ds)} validation examples, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")

    def evaluate_fn(m):
        return task.evaluate(m, eval_ds, tokenizer, accelerator=acc, batch_size=training.per_device_eval_batch_size,
                             description=f"eval {task.name}")

    with RunOutput(run.output_dir, "train", settings, overwrite=run.overwrite, resume=run.resume,
                   accelerator=acc) as out:
        result = fit(model, train_ds, training=training, run=run, workdir=out.tmp_dir, collate_fn=collate,
                     evaluate_fn=evaluate_fn, metric_for_best=task.primary_metric,
                     greater_is_better=task.greater_is_better,
                     compute_loss=task.compute_loss, accelerator=acc,
                     description=f"train {task.name}")
        best = next((h for h in result.history if h.get("step") == result.best_step and
                     any(k.startswith("eval_") for k in h)), None)
        metrics = {k[5:]: v for k, v in (best or {}).items() if k.startswith("eval_")}
        if acc.is_main_process and settings.delta.active:  # PEFT seam: the module folder, not the model
            from mergekit_lab.delta.train import save_trained

            save_trained(acc.unwrap_model(model), out.tmp_dir, base_model=settings.model.name_or_path, task=task)
            tokenizer.save_pretrained(out.tmp_dir)
        elif acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(out.tmp_dir, safe_serialization=True)
            tokenizer.save_pretrained(out.tmp_dir)
        out.metrics = {"validation": metrics, "train_loss": result.train_loss}
        out.rows = [{"model": str(run.output_dir), "kind": "trained", "task": task.name, "split": "validation",
                     "metrics": metrics}]
        out.artifacts = {"model": "."}
        out.extra = {"task": {"name": task.name, "problem_type": task.problem_type, "labels": task.label_names},
                     "training": result.to_dict(), "train_examples": len(train_ds), "eval_examples": len(eval_ds)}
        data_out = out.results()
    if metrics:
        log(f"done: validation {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())} -> {run.output_dir}")
    return data_out


def run_train(settings: TrainSettings) -> None:
    from mergekit_lab.models.zoo import get_or_train
    from mergekit_lab.runtime import log

    if settings.zoo.zoo_dir is None:
        train_model(settings)
        return
    path, reused = get_or_train(settings, settings.zoo.zoo_dir, retrain=settings.zoo.retrain)
    out = settings.run.output_dir
    if out is not None and Path(out).resolve() != path.resolve():
        if Path(out).exists():
            if not settings.run.overwrite:
                raise UserError(f"output folder {str(out)!r} already exists", hint="pass --overwrite")
            shutil.rmtree(out)
        _link_copy(path, Path(out))
    log(f"{'reused' if reused else 'trained'} zoo model {path}")


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command

    register_command(app, "train", TrainSettings, run_train,
                     help="Fine-tune a model on a task (Accelerate loop) and write the model folder + results.json.")
