"""``mklab similarity``: score a pool of modules against target task(s), write weights and figures."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from mergekit_lab.delta.modules import ModuleFolder, is_module_folder, read_module
from mergekit_lab.errors import UserError
from mergekit_lab.runtime import log
from mergekit_lab.similarity.ensemble import check_pool, module_family
from mergekit_lab.similarity.measures import get_measure
from mergekit_lab.similarity.scoring import TargetContext, score_sources
from mergekit_lab.similarity.weights import (
    category_weights,
    make_weights_file,
    parse_categories,
    softmax_weights,
    uniform_weights,
)


def collect_pool(entries: list[str | Path]) -> list[ModuleFolder]:
    """Module folders given directly or as the subfolders of a pool folder (sorted, unique names)."""
    if not entries:
        raise UserError("no pool given", hint="pass --pool DIR (a folder of module folders) or module folders")
    found: list[ModuleFolder] = []
    for e in entries:
        p = Path(e)
        if is_module_folder(p):
            found.append(read_module(p))
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and is_module_folder(d))
            if not subs:
                raise UserError(f"pool folder {str(p)!r} holds no module folders",
                                hint="train modules with mklab train --peft ... --output-dir POOL/NAME")
            found.extend(read_module(d) for d in subs)
        else:
            raise UserError(f"pool entry {str(p)!r} does not exist")
    names = [m.name for m in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two pool modules share the folder name {dup[0]!r}", hint="give the modules distinct names")
    return found


def short_label(task: str) -> str:
    """A figure label for a task name: ``file:`` tasks by their file or folder name."""
    return Path(task[len("file:"):]).name if task.startswith("file:") else task


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-") or "target"


def build_context(settings, target: str, pool: list[ModuleFolder], needs_train: bool) -> TargetContext:
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.settings import ModelSettings
    from mergekit_lab.tasks import get_task

    sim, data, run = settings.similarity, settings.data, settings.run
    task = get_task(target)
    family = module_family(pool[0])
    if family == "text-to-text" and task.family != "seq2seq":
        raise UserError(f"the pool holds text-to-text modules ({pool[0].name}: {pool[0].config.get('task_type')}) "
                        f"but target {target} is a {task.family} task",
                        hint=f"score text-to-text modules on a t2t/ task, e.g. --target t2t/{target}")
    if family != "text-to-text" and task.family == "seq2seq":
        raise UserError(f"target {target} is a text-to-text task but the pool holds classifier modules "
                        f"({pool[0].name}: {pool[0].config.get('task_type')})",
                        hint="score classifier modules on a classification task, e.g. --target "
                             f"{target.removeprefix('t2t/')}; or train T5 modules with --task t2t/...")
    base_ref = settings.model.name_or_path or pool[0].base_model
    ms = ModelSettings(name_or_path=base_ref, tokenizer=settings.model.tokenizer,
                       trust_remote_code=settings.model.trust_remote_code)
    tokenizer = load_tokenizer(ms)
    n = min(sim.num_examples or sim.max_examples, sim.max_examples)
    try:
        dev = load_task_data(task, "validation", data, tokenizer, max_samples=n, seed=run.seed)
    except UserError as e:
        raise UserError(f"target {target} has no usable dev data: {e.message}",
                        hint=e.hint or "pass --data-dir with the target's dev split") from None
    if len(dev) == 0:
        raise UserError(f"target {target} has no dev data", hint="pass --data-dir with the target's dev split")
    base = task.build_model(ms, seed=run.seed, tokenizer=tokenizer)
    base.eval()

    def train_loader():
        try:
            return load_task_data(task, "train", data, tokenizer, max_samples=data.max_train_samples, seed=run.seed,
                                  k_shot=data.k_shot)
        except UserError as e:
            raise UserError(f"target {target} has no training data for the short tunes: {e.message}") from None

    return TargetContext(task=task, tokenizer=tokenizer, base=base, dev=dev, pool_config=pool[0], run=run,
                         training=settings.training, train_loader=train_loader, head=sim.head,
                         categories=parse_categories(sim.categories), batch_size=settings.training.per_device_eval_batch_size)


def weights_for(measure_name: str, scores: dict[str, Any], sim) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                                         float | None]:
    """Model-level weights, per-group weights (block/layer granularity) and the temperature used."""
    m = get_measure(measure_name)
    if m.name == "uniform":
        return uniform_weights(list(scores["scores"])), {}, None
    if m.name == "category":
        return category_weights(scores["scores"]), {}, None
    tau = sim.temperature if sim.temperature is not None else m.temperature
    w = softmax_weights(scores["scores"], m.sign, tau)
    groups: dict[str, dict[str, float]] = {}
    if sim.granularity != "model":
        if not m.grouped:
            raise UserError(f"measure {m.name} gives one score per module, not per {sim.granularity}",
                            hint="use --granularity model, or grand / euclidean / cos_weights")
        for g, per in scores["groups"][sim.granularity].items():
            groups[g] = softmax_weights(per, m.sign, tau)
    return w, groups, tau


def run_similarity(settings) -> dict[str, Any]:
    from mergekit_lab.results import RunOutput, write_json_atomic
    from mergekit_lab.runtime import seed_everything
    from mergekit_lab.similarity.plots import bar_chart, heatmap

    sim, run = settings.similarity, settings.run
    if run.output_dir is None:
        raise UserError("no output folder given", hint="pass --output-dir DIR")
    if not sim.measure:
        raise UserError("no measure given", hint="pass --measure NAME")
    measures = [get_measure(m) for m in sim.measure]
    if sim.temperature is not None and sim.temperature <= 0:
        raise UserError(f"temperature must be > 0, got {sim.temperature}")
    if sim.granularity != "model":
        flat = [m.name for m in measures if not m.grouped]
        if flat:
            raise UserError(f"measure {flat[0]} gives one score per module, not per {sim.granularity}",
                            hint="use --granularity model, or grand / euclidean / cos_weights")
    pool = collect_pool(sim.pool)
    check_pool(pool)
    if sim.all_targets:
        if settings.data.task:
            raise UserError("give either --target or --all-targets, not both")
        no_task = [m.name for m in pool if not m.task]
        if no_task:
            raise UserError(f"pool module(s) {', '.join(no_task)} do not record their task",
                            hint="--all-targets needs modules written by mklab train")
        targets = list(dict.fromkeys(m.task for m in pool))
    else:
        if not settings.data.task:
            raise UserError("no target given", hint="pass --target TASK or --all-targets")
        targets = [settings.data.task]
    needs_train = any(m.needs_reference or m.needs_tune for m in measures) or sim.head == "reference"
    seed_everything(run.seed)

    all_scores: dict[str, Any] = {}
    all_weights: dict[str, dict[str, dict[str, Any]]] = {m.name: {} for m in measures}
    rows: list[dict[str, Any]] = []
    with RunOutput(run.output_dir, "similarity", settings, overwrite=run.overwrite) as out:
        for target in targets:
            sources = [m for m in pool if m.task != target]
            excluded = [m for m in pool if m.task == target]
            if not sources:
                raise UserError(f"no source modules left for target {target} (the pool holds only its own)")
            log(f"similarity: target {target}, {len(sources)} sources, measures {', '.join(sim.measure)}")
            t0 = time.time()
            ctx = build_context(settings, target, pool, needs_train)
            scores = score_sources(ctx, sources, sim.measure)
            entry: dict[str, Any] = {"excluded": [m.name for m in excluded], "measures": {},
                                     "reference_seconds": round(ctx._reference.seconds, 3) if ctx._reference else None,
                                     "examples": len(ctx.dev), "seconds": round(time.time() - t0, 3)}
            src_info = [{"name": m.name, "path": str(m.path.resolve()), "task": m.task} for m in sources]
            excl_info = [{"name": m.name, "path": str(m.path.resolve()), "task": m.task, "reason": "target"}
                         for m in excluded]
            for m in measures:
                sc = scores[m.name]
                w, groups, tau = weights_for(m.name, sc, sim)
                entry["measures"][m.name] = {"sign": m.sign, "temperature": tau, **sc, "weights": w,
                                             "group_weights": groups}
                all_weights[m.name][target] = make_weights_file(
                    target=target, measure=m.name, sign=m.sign, temperature=tau, granularity=sim.granularity,
                    sources=src_info, weights=w, groups=groups, excluded=excl_info)
                for src in sources:
                    rows.append({"model": src.name, "kind": "similarity", "task": target, "split": "validation",
                                 "measure": m.name, "source_task": src.task,
                                 "metrics": {"score": sc["scores"][src.name], "weight": w[src.name],
                                             "seconds": sc["seconds"][src.name]}})
            all_scores[target] = entry
        tmp = out.tmp_dir
        write_json_atomic(tmp / "scores.json", {"format": "mklab-similarity-scores", "version": 1,
                                                "targets": all_scores})
        artifacts = {"scores": "scores.json", "weights": "weights.json"}
        first = measures[0].name
        if sim.all_targets:
            names = [m.name for m in pool]
            for m in measures:
                for target, wf in all_weights[m.name].items():
                    write_json_atomic(tmp / "weights" / m.name / f"{slug(target)}.json", wf)
                matrix = {t: dict(wf["weights"]) for t, wf in all_weights[m.name].items()}
                suffix = "" if m.name == first else f"_{m.name}"
                write_json_atomic(tmp / f"weights{suffix}.json",
                                  {"format": "mklab-similarity-weights-matrix", "version": 1, "measure": m.name,
                                   "rows": "targets", "columns": names, "matrix": matrix,
                                   "files": {t: f"weights/{m.name}/{slug(t)}.json" for t in matrix}})
                # rows are targets; the columns are the pool's modules; the target's own module is blank
                labels = {t: short_label(t) for t in matrix}
                if len(set(labels.values())) < len(labels):  # two files of the same name: full names
                    labels = {t: t for t in matrix}
                heatmap({labels[t]: matrix[t] for t in matrix}, names, tmp / f"heatmap{suffix}.png",
                        title=f"weights ({m.name})")
                artifacts[f"heatmap{suffix}"] = f"heatmap{suffix}.png"
        else:
            target = targets[0]
            for m in measures:
                suffix = "" if m.name == first else f"_{m.name}"
                write_json_atomic(tmp / f"weights{suffix}.json", all_weights[m.name][target])
                bar_chart(all_weights[m.name][target]["weights"], tmp / f"bar{suffix}.png",
                          title=f"{short_label(target)}: weights ({m.name})")
                artifacts[f"bar{suffix}"] = f"bar{suffix}.png"
        out.rows = rows
        out.metrics = {t: {m: e["measures"][m]["weights"] for m in e["measures"]} for t, e in all_scores.items()}
        out.artifacts = artifacts
        out.extra = {"targets": targets, "pool": [str(m.path.resolve()) for m in pool], "measures": sim.measure,
                     "timing": {t: {m: e["measures"][m]["seconds"] for m in e["measures"]} |
                                {"reference": e["reference_seconds"]} for t, e in all_scores.items()}}
        result = out.results()
    for t, e in all_scores.items():
        for m, me in e["measures"].items():
            best = max(me["weights"], key=me["weights"].get)
            log(f"{t} [{m}]: top source {best} ({me['weights'][best]:.3f})")
    return result
