"""Merge experiments: resolve models (folders or zoo aliases), collect statistics, merge with
one or more methods under a strategy (all / pairwise / greedy), evaluate in-domain and
out-of-domain against baselines (individual models, their ensemble, multi-task learning), and
return result rows. ``mklab merge`` is a thin wrapper around :func:`run_merge_experiment`.

Conventions:

- A model's task is given by its zoo alias, by ``model_tasks``, or read from the
  ``results.json`` that ``mklab train`` writes next to it.
- In-domain tasks of a merged model are the tasks of the models it merges; the other evaluation
  tasks are out-of-domain (OOD). A model is evaluated on a task only when its head fits the
  task's label space (same label names), so with ``heads=keep`` each task is evaluated with its
  own head on the merged body, and OOD rows appear when the label spaces are shared.
- The ensemble averages the logits of the models (label-aware for multi-label heads: a label's
  logit is averaged over the models whose training data annotate it). With kept heads, task t's
  ensemble applies t's head to every model's body and averages those logits.
- Multi-task learning trains one model on the union of the merged models' training data (same
  per-task sample budget and training settings) through the zoo; it needs one shared label space.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_lab.data import resolve_max_seq_length
from mergekit_lab.errors import UserError
from mergekit_lab.merging import task_variants
from mergekit_lab.merging.checks import head_names, read_config
from mergekit_lab.merging.engine import merge_models
from mergekit_lab.merging.io import open_checkpoint
from mergekit_lab.merging.registry import get_method_class, make_method
from mergekit_lab.merging.statistics import (
    compute_fisher,
    compute_grams,
    ensure_statistics,
    model_fingerprint,
    statistics_path,
)


@dataclass
class ResolvedModel:
    name: str
    path: Path
    task: Any  # mergekit_lab.tasks.Task
    data_dir: str | None
    train_seed: int
    label_mask: list[bool] | None = None
    stats: dict[str, Path] = field(default_factory=dict)
    eval_task: Any = None  # the task it is evaluated on in-domain (a partition's parent task)

    def __post_init__(self) -> None:
        if self.eval_task is None:
            self.eval_task = self.task


def _log(msg: str) -> None:
    from mergekit_lab.runtime import log

    log(msg)


def _task_from_results(path: Path) -> str | None:
    f = path / "results.json"
    if f.exists():
        try:
            data = json.loads(f.read_text())
        except ValueError:
            return None
        t = data.get("task")
        if isinstance(t, dict):
            return t.get("name")
        return (data.get("settings", {}).get("data") or {}).get("task")
    return None


def _train_settings(settings, task_name: str, seed: int, data_dir: str | None, max_train_samples: int | None,
                    num_train_epochs: float | None = None):
    from mergekit_lab.cli.train import TrainSettings, ZooSettings
    from mergekit_lab.settings import DataSettings, ModelSettings, RunSettings

    if not settings.model.base_model:
        raise UserError(f"model alias for {task_name} must be trained, but no base model is given",
                        hint="pass --base-model (e.g. builtin:minilm) or give model folders")
    return TrainSettings(
        run=RunSettings(seed=seed, precision=settings.run.precision, cpu_only=settings.run.cpu_only,
                        quiet=settings.run.quiet),
        model=ModelSettings(name_or_path=settings.model.base_model),
        data=DataSettings(task=task_name, data_dir=data_dir, max_seq_length=settings.data.max_seq_length,
                          max_train_samples=max_train_samples),
        training=settings.training.model_copy(
            deep=True, update={} if num_train_epochs is None else {"num_train_epochs": num_train_epochs}),
        zoo=ZooSettings(),
    )


def _zoo_dir(settings) -> Path:
    if settings.zoo.zoo_dir is not None:
        return Path(settings.zoo.zoo_dir)
    return Path("runs") / "zoo"


def resolve_models(settings) -> list[ResolvedModel]:
    """Model folders and aliases -> trained model folders with their tasks (zoo on demand)."""
    from mergekit_lab.models import resolve_model_ref
    from mergekit_lab.models.zoo import get_or_train
    from mergekit_lab.tasks import get_task

    ms, data = settings.model, settings.data
    names = list(ms.models)
    if ms.filter_model:
        unknown = [f for f in ms.filter_model if f not in names and f not in [Path(n).name for n in names]]
        if unknown:
            raise UserError(f"--filter-model names {unknown} are not among the models {names}")
        names = [n for n in names if n in ms.filter_model or Path(n).name in ms.filter_model]
    if ms.model_tasks and len(ms.model_tasks) != len(ms.models):
        raise UserError(f"{len(ms.model_tasks)} model tasks given for {len(ms.models)} models",
                        hint="give one task per model in --model-tasks, in the same order")
    out: list[ResolvedModel] = []
    for name in names:
        idx = ms.models.index(name)
        if name in ms.model_specs:
            spec = ms.model_specs[name]
            seed = spec.seed if spec.seed is not None else settings.run.seed
            task_name = spec.task
            if spec.partition is not None:
                if not data.partitions:
                    raise UserError(f"model {name} names partition {spec.partition} but no --partitions is set")
                task_name = task_variants.noniid_name(spec.task, spec.partition, data.partitions, data.partition_size,
                                                      data.partition_share, settings.run.seed)
            data_dir = spec.data_dir or data.data_dir
            ts = _train_settings(settings, task_name, seed, data_dir, spec.max_train_samples or data.max_train_samples,
                                 spec.num_train_epochs)
            path, reused = get_or_train(ts, _zoo_dir(settings), retrain=settings.zoo.retrain)
            _log(f"model {name}: {'reused' if reused else 'trained'} {path}")
            out.append(ResolvedModel(name, path, get_task(task_name), data_dir, seed, eval_task=get_task(spec.task)))
        else:
            path = Path(resolve_model_ref(name))
            if not path.is_dir():
                raise UserError(f"model {name!r} is neither a local folder nor an alias in model_specs",
                                hint="give fine-tuned model folders, or define the alias under model.model_specs")
            task_name = ms.model_tasks[idx] if ms.model_tasks else _task_from_results(path)
            if not task_name:
                raise UserError(f"cannot tell which task model {name!r} was trained on",
                                hint="pass --model-tasks (one per model) or use folders written by `mklab train`")
            seed = settings.run.seed
            out.append(ResolvedModel(Path(name).name, path, get_task(task_name), data.data_dir, seed))
    seen: set[str] = set()
    for m in out:
        if m.name in seen:
            raise UserError(f"two models are named {m.name!r}", hint="use distinct folder names or aliases")
        seen.add(m.name)
    return out


class Evaluator:
    """Encodes each (task, split) once and evaluates models / logits on it."""

    def __init__(self, settings, tokenizer, accelerator):
        self.settings = settings
        self.tok = tokenizer
        self.acc = accelerator
        self._cache: dict[tuple[str, str, str | None], Any] = {}

    def dataset(self, task, split: str, data_dir: str | None):
        from mergekit_lab.data import load_task_data
        from mergekit_lab.settings import DataSettings

        key = (task.name, split, data_dir)
        if key not in self._cache:
            d = DataSettings(task=task.name, data_dir=data_dir, max_seq_length=self.settings.data.max_seq_length,
                             max_eval_samples=self.settings.data.max_eval_samples)
            self._cache[key] = load_task_data(task, split, d, self.tok, max_samples=d.max_eval_samples,
                                              seed=self.settings.run.seed)
        return self._cache[key]

    def logits(self, model, task, split: str, data_dir: str | None, desc: str):
        from mergekit_lab.evaluation.evaluate import predict

        ds = self.dataset(task, split, data_dir)
        return predict(model.to(self.acc.device), ds, task.collator(self.tok), self.acc,
                       self.settings.training.per_device_eval_batch_size, desc)


def _fits(model_task, eval_task) -> bool:
    return model_task.label_names == eval_task.label_names and model_task.problem_type == eval_task.problem_type


def _label_mask(m: ResolvedModel) -> list[bool] | None:
    if m.task.problem_type != "multi_label_classification":
        return None
    ds = m.task.load("train", m.data_dir)
    if "label_mask" not in ds.column_names:
        return [True] * m.task.num_labels
    return [bool(x) for x in np.asarray(ds["label_mask"]).any(0)]


def _stats_request(settings, m: ResolvedModel, kind: str, variant: str | None) -> dict[str, Any]:
    st = settings.stats
    return {
        "kind": kind,
        "variant": variant,
        "n_examples": st.stats_examples,
        "batch_size": st.stats_batch_size,
        "dtype": st.gram_dtype if kind == "grams" else "float32",
        "padding": "excluded",
        "per_example": st.fisher_per_example if kind == "fisher" else None,
        "data": {"task": m.task.name, "data_dir": str(m.data_dir), "split": "train",
                 "max_seq_length": resolve_max_seq_length(m.task, settings.data), "seed": m.train_seed},
        "model_fingerprint": model_fingerprint(m.path),
    }


def ensure_model_statistics(settings, m: ResolvedModel, kind: str, variant: str | None, tokenizer) -> Path:
    """Compute (or reuse) one model's Grams / Fisher on its own training data."""
    from torch.utils.data import DataLoader

    from mergekit_lab.data import load_task_data
    from mergekit_lab.settings import DataSettings

    st = settings.stats
    stats_dir = st.stats_dir
    if stats_dir is None and not os.access(m.path, os.W_OK):
        stats_dir = Path(settings.run.output_dir or ".").parent / ".mklab_stats"
    path = statistics_path(m.path, kind, variant, stats_dir=stats_dir)
    request = _stats_request(settings, m, kind, variant)

    def compute():
        d = DataSettings(task=m.task.name, data_dir=m.data_dir, max_seq_length=settings.data.max_seq_length)
        ds = load_task_data(m.task, "train", d, tokenizer, max_samples=st.stats_examples, seed=m.train_seed)
        loader = DataLoader(ds, batch_size=st.stats_batch_size, shuffle=False, collate_fn=m.task.collator(tokenizer))
        model = m.task.load_trained(str(m.path))
        _log(f"statistics: {kind}{'/' + variant if variant else ''} of {m.name} on {len(ds)} {m.task.name} examples")
        if kind == "grams":
            dtype = torch.float64 if st.gram_dtype == "float64" else torch.float32
            return compute_grams(model, loader, dtype=dtype, total_batches=len(loader), progress=not settings.run.quiet)
        return compute_fisher(model, loader, variant=variant or "hard", loss_fn=m.task.loss,
                              problem_type=m.task.problem_type, per_example=st.fisher_per_example,
                              total_batches=len(loader), progress=not settings.run.quiet)

    p, reused = ensure_statistics(path, request, compute, force=st.recompute_stats)
    return p


def _read_weights(settings, models: list[ResolvedModel]) -> list[float] | None:
    f = settings.merge.weights
    if f is None:
        return None
    try:
        data = json.loads(Path(f).read_text())
    except FileNotFoundError:
        raise UserError(f"weights file {str(f)!r} does not exist") from None
    except ValueError as e:
        raise UserError(f"weights file {str(f)!r} is not JSON: {e}") from None
    if isinstance(data, dict) and "weights" in data:
        data = data["weights"]
    if isinstance(data, list):
        if len(data) != len(models):
            raise UserError(f"weights file {str(f)!r} has {len(data)} weights for {len(models)} models")
        return [float(x) for x in data]
    if isinstance(data, dict):
        out = []
        for m in models:
            key = next((k for k in (m.name, str(m.path), m.path.name) if k in data), None)
            if key is None:
                raise UserError(f"weights file {str(f)!r} has no weight for model {m.name!r}",
                                hint=f"its keys: {', '.join(map(str, data))}")
            out.append(float(data[key]))
        return out
    raise UserError(f"weights file {str(f)!r} must hold a list of numbers or a mapping model -> weight")


def method_params(settings, method: str) -> dict[str, Any]:
    mp = settings.merge.method_params or {}
    if mp and all(k in mp and isinstance(mp[k], dict) for k in mp) and set(mp) <= set(_all_methods()):
        return dict(mp.get(method, {}))
    if mp and len(settings.merge.method) > 1:
        raise UserError("with several --method values, --method-params must map method names to parameters",
                        hint="e.g. --method-params '{regmean: {alpha: 0.1}}'")
    return dict(mp)


def _all_methods() -> list[str]:
    from mergekit_lab.merging.registry import list_methods

    return list_methods()


def _combos(settings, models: list[ResolvedModel], ood_scores: dict[str, float]) -> list[tuple[int | None, list[ResolvedModel]]]:
    strat = settings.merge.strategy
    if strat == "all":
        return [(None, models)]
    if strat == "pairwise":
        return [(None, [a, b]) for a, b in itertools.combinations(models, 2)]
    order = list(models)
    if settings.merge.greedy_order == "ood":
        if not ood_scores:
            raise UserError("greedy order 'ood' needs out-of-domain evaluation tasks",
                            hint="add --eval-tasks with tasks none of the models was trained on")
        order.sort(key=lambda m: -ood_scores.get(m.name, float("-inf")))
    return [(k, order[:k]) for k in range(2, len(order) + 1)]


def _primary(task, metrics: dict[str, float]) -> float | None:
    v = metrics.get(task.primary_metric)
    return float(v) if v is not None else None


def run_merge_experiment(settings, out_dir: Path) -> dict[str, Any]:
    """Run the whole experiment, writing merged models under ``out_dir``; returns
    {"rows", "metrics", "extra"} for results.json."""
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.runtime import make_accelerator, seed_everything
    from mergekit_lab.settings import ModelSettings
    from mergekit_lab.tasks import canonical_split, get_task

    t0 = time.perf_counter()
    mo = settings.merge
    for meth in mo.method:
        get_method_class(meth)
        make_method(meth, method_params(settings, meth))  # validate parameters before any work
    seed_everything(settings.run.seed)
    acc = make_accelerator(settings.run)
    models = resolve_models(settings)
    if len(models) < 2:
        raise UserError(f"merging needs at least 2 models, got {len(models)}", hint="give more --models")
    weights_all = _read_weights(settings, models)
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(models[0].path)))
    evaluator = Evaluator(settings, tokenizer, acc)
    eval_tasks = [get_task(t) for t in settings.data.eval_tasks] or list(
        {m.eval_task.name: m.eval_task for m in models}.values())
    splits = [canonical_split(s) for s in settings.data.eval_splits]
    model_task_names = {m.eval_task.name for m in models}
    eval_dir = {t.name: next((m.data_dir for m in models if m.eval_task.name == t.name), settings.data.data_dir)
                for t in eval_tasks}
    for m in models:
        m.label_mask = _label_mask(m)

    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}

    def add_rows(label: str, kind: str, task, split: str, metrics: dict, combo: list[ResolvedModel], **extra):
        rows.append({"model": label, "kind": kind, "task": task.name, "split": split,
                     "domain": "in" if task.name in {c.eval_task.name for c in combo} else "ood",
                     "metrics": metrics, "models": [c.name for c in combo], **extra})

    # individual models (always needed for greedy-by-OOD ordering; reported when asked)
    want_individual = "individual" in mo.baselines or (mo.strategy == "greedy" and mo.greedy_order == "ood")
    ood_scores: dict[str, float] = {}
    logit_cache: dict[tuple[str, str, str], tuple] = {}
    if want_individual:
        t = time.perf_counter()
        for m in models:
            model = m.task.load_trained(str(m.path))
            ood_vals = []
            for task in eval_tasks:
                if not _fits(m.task, task):
                    continue
                for split in splits:
                    lg, lb, mk = evaluator.logits(model, task, split, eval_dir[task.name], f"eval {m.name} {task.name}")
                    logit_cache[(m.name, task.name, split)] = (lg, lb, mk)
                    metrics = task.compute_metrics(lg, lb, mk)
                    if "individual" in mo.baselines:
                        add_rows(m.name, "individual", task, split, metrics, [m])
                    if task.name not in model_task_names and split == splits[0]:
                        v = _primary(task, metrics)
                        if v is not None:
                            ood_vals.append(v)
            if ood_vals:
                ood_scores[m.name] = float(np.mean(ood_vals))
        timings["individual_eval_s"] = time.perf_counter() - t

    combos = _combos(settings, models, ood_scores)

    # statistics
    t = time.perf_counter()
    stats_used: dict[str, dict[str, str]] = {}
    for meth in mo.method:
        cls = get_method_class(meth)
        if cls.stats_kind is None:
            continue
        variant = method_params(settings, meth).get("variant", "hard") if cls.stats_kind == "fisher" else None
        for m in models:
            p = ensure_model_statistics(settings, m, cls.stats_kind, variant, tokenizer)
            m.stats[meth] = p
            stats_used.setdefault(m.name, {})[meth] = str(p)
    timings["statistics_s"] = time.perf_counter() - t

    merge_reports: list[dict[str, Any]] = []
    merged_root = out_dir / "merged"
    base_model = None
    if settings.model.base_model:
        from mergekit_lab.models import resolve_model_ref

        base_model = resolve_model_ref(settings.model.base_model)
    t_merge = t_eval = 0.0
    for step, combo in combos:
        combo_label = "+".join(c.name for c in combo)
        idx = [models.index(c) for c in combo]
        w = [weights_all[i] for i in idx] if weights_all else None
        extra = {"step": step} if step is not None else {}
        for meth in mo.method:
            cls = get_method_class(meth)
            if cls.needs_base and base_model is None:
                raise UserError(f"merge method {meth!r} needs the pretrained base model", hint="pass --base-model")
            heads = mo.heads
            label_masks = None
            if heads == "merge" and all(c.label_mask is not None for c in combo):
                label_masks = [c.label_mask for c in combo]
            odir = merged_root / combo_label / meth
            ts = time.perf_counter()
            res = merge_models(
                [c.path for c in combo], meth, method_params(settings, meth), output_dir=odir,
                base_model=base_model if cls.needs_base else None, weights=w,
                statistics=[c.stats[meth] for c in combo] if cls.stats_kind else None,
                heads=heads, label_masks=label_masks, names=[c.name for c in combo] if heads == "keep" else None,
                max_shard_size=mo.max_shard_size, progress=not settings.run.quiet,
            )
            t_merge += time.perf_counter() - ts
            merge_reports.append({"combo": combo_label, "step": step, **res.report})
            label = f"{meth}[{combo_label}]"
            ts = time.perf_counter()
            for task in eval_tasks:
                if heads == "keep":
                    owner = next((c for c in combo if c.eval_task.name == task.name), None)
                    if owner is None:
                        owner = next((c for c in combo if _fits(c.task, task)), None)
                    if owner is None:
                        continue
                    folder = res.outputs[owner.name]
                else:
                    if not _fits(combo[0].task, task):
                        continue
                    folder = res.outputs["merged"]
                model = task.load_trained(str(folder))
                for split in splits:
                    lg, lb, mk = evaluator.logits(model, task, split, eval_dir[task.name], f"eval {label} {task.name}")
                    add_rows(label, "merged", task, split, task.compute_metrics(lg, lb, mk), combo, method=meth,
                             **extra)
            t_eval += time.perf_counter() - ts
            if not mo.save_models:
                shutil.rmtree(odir, ignore_errors=True)
        if "ensemble" in mo.baselines:
            ts = time.perf_counter()
            _ensemble_rows(settings, combo, eval_tasks, splits, evaluator, eval_dir, add_rows, extra, logit_cache)
            t_eval += time.perf_counter() - ts
        if "multitask" in mo.baselines:
            _multitask_rows(settings, combo, eval_tasks, splits, evaluator, eval_dir, add_rows, extra)
    timings.update(merge_s=t_merge, merged_eval_s=t_eval, total_s=time.perf_counter() - t0)

    summary = summarize(rows)
    extra_out = {
        "merge": {"methods": mo.method, "params": {m: method_params(settings, m) for m in mo.method},
                  "strategy": mo.strategy, "heads": mo.heads, "weights": weights_all},
        "models": [{"name": m.name, "path": str(m.path), "task": m.task.name, "label_mask": m.label_mask}
                   for m in models],
        "statistics": stats_used,
        "merge_reports": merge_reports,
        "timings": timings,
        "summary": summary,
    }
    return {"rows": rows, "metrics": summary, "extra": extra_out}


def _ensemble_rows(settings, combo, eval_tasks, splits, evaluator, eval_dir, add_rows, extra, logit_cache):
    label = f"ensemble[{'+'.join(c.name for c in combo)}]"
    for task in eval_tasks:
        if settings.merge.heads == "keep":
            owner = next((c for c in combo if c.eval_task.name == task.name), None) or next(
                (c for c in combo if _fits(c.task, task)), None)
            if owner is None:
                continue
            members = combo
        else:
            if not _fits(combo[0].task, task):
                continue
            owner, members = None, combo
        for split in splits:
            outs = []
            for c in members:
                key = (c.name, task.name, split)
                if owner is None or c is owner:
                    if key not in logit_cache:
                        mdl = task.load_trained(str(c.path))
                        logit_cache[key] = evaluator.logits(mdl, task, split, eval_dir[task.name], f"eval {c.name}")
                    outs.append(logit_cache[key])
                else:  # task head of the owner on model c's body
                    mdl = _body_with_head(c.path, owner.path, task)
                    outs.append(evaluator.logits(mdl, task, split, eval_dir[task.name], f"eval {c.name}+head"))
            lb, mk = outs[0][1], outs[0][2]
            stack = np.stack([o[0] for o in outs])
            if task.problem_type == "multi_label_classification" and all(c.label_mask is not None for c in members):
                wm = np.array([c.label_mask for c in members], dtype=np.float64)[:, None, :]  # models x 1 x labels
                wsum = wm.sum(0)
                avg = np.where(wsum > 0, (stack * wm).sum(0) / np.maximum(wsum, 1), stack.mean(0))
            else:
                avg = stack.mean(0)
            add_rows(label, "ensemble", task, split, task.compute_metrics(avg, lb, mk), list(combo), **extra)


def _body_with_head(body_path: Path, head_path: Path, task):
    model = task.load_trained(str(head_path))
    src = open_checkpoint(body_path)
    heads = head_names(src.keys(), read_config(body_path))
    body = {k: src.get(k) for k in src.keys() if k not in heads}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected:
        raise UserError(f"model {body_path} does not share the body of {head_path}: unexpected {unexpected[:3]}")
    return model


def _multitask_rows(settings, combo, eval_tasks, splits, evaluator, eval_dir, add_rows, extra):
    from mergekit_lab.models.zoo import get_or_train
    from mergekit_lab.tasks import get_task

    names = [c.task.name for c in combo]
    if any(not _fits(combo[0].task, c.task) for c in combo):
        _log(f"multitask baseline skipped for {'+'.join(c.name for c in combo)}: the tasks have different label spaces")
        return
    if len(set(c.data_dir for c in combo)) > 1:
        _log("multitask baseline skipped: the models' data live in different folders")
        return
    if len(set(names)) < 2:
        _log("multitask baseline skipped: all models share one task (train one model on the full task instead)")
        return
    seed = combo[0].train_seed
    union = task_variants.union_name(names, settings.data.max_train_samples, seed)
    ts = _train_settings(settings, union, seed, combo[0].data_dir, None)
    path, reused = get_or_train(ts, _zoo_dir(settings), retrain=settings.zoo.retrain)
    label = f"multitask[{'+'.join(c.name for c in combo)}]"
    ut = get_task(union)
    model = ut.load_trained(str(path))
    for task in eval_tasks:
        if not _fits(ut, task):
            continue
        for split in splits:
            lg, lb, mk = evaluator.logits(model, task, split, eval_dir[task.name], f"eval {label} {task.name}")
            add_rows(label, "multitask", task, split, task.compute_metrics(lg, lb, mk), list(combo), **extra)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model label: mean primary metric over its in-domain and OOD rows (first split)."""
    from mergekit_lab.tasks import get_task

    out: dict[str, Any] = {}
    for r in rows:
        task = get_task(r["task"])
        v = r["metrics"].get(task.primary_metric)
        if v is None:
            continue
        d = out.setdefault(r["model"], {"kind": r["kind"], "in": [], "ood": []})
        d[r["domain"]].append(float(v))
    for d in out.values():
        ins, oods = d.pop("in"), d.pop("ood")
        d["mean_in_domain"] = float(np.mean(ins)) if ins else None
        d["mean_ood"] = float(np.mean(oods)) if oods else None
    return out
