"""Task variants used by merge experiments, registered as task-name prefixes.

``noniid:<task>:<i>of<n>:<size>:<share>:<seed>``
    Partition ``i`` (0-based) of ``n`` non-IID partitions of ``<task>``'s training split (the
    RegMean paper's GLUE "subset" setting): every partition holds ``size`` examples, a ``share``
    (e.g. 0.8) of them drawn from one label (partition i's major label is the i-th label, cycling),
    the rest drawn uniformly from the other labels; partitions are disjoint and seeded. The
    validation and test splits are the task's own, so models trained on different partitions
    share one label space and are merged with their heads merged.

``union:<task1>+<task2>+...[:each=<N>:seed=<S>]``
    The concatenation of the tasks' splits (same label space required), for the multi-task
    learning baseline: one model trained on the union of the merged models' data. With
    ``each=N`` the training split keeps, of each task, exactly the N examples an individual model
    trained with ``max_train_samples=N`` and seed S saw.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from mergekit_lab.errors import UserError
from mergekit_lab.tasks import get_task
from mergekit_lab.tasks.base import Task, register_task_prefix


def noniid_name(task: str, index: int, n: int, size: int, share: float, seed: int) -> str:
    return f"noniid:{task}:{index}of{n}:{size}:{share}:{seed}"


def partition_indices(labels: list[int], index: int, n: int, size: int, share: float, seed: int) -> list[int]:
    """Indices of partition ``index`` (see the module docstring); UserError when too few examples."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError("a non-IID partition needs a classification task with at least 2 labels")
    by = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    rng = random.Random(seed)
    for c in classes:
        rng.shuffle(by[c])
    taken = {c: 0 for c in classes}
    result: list[int] = []
    for p in range(n):
        major = classes[p % len(classes)]
        n_major = int(round(share * size))
        others = [c for c in classes if c != major]
        picks: list[int] = []
        if taken[major] + n_major > len(by[major]):
            raise UserError(f"not enough examples of label {major} for {n} partitions of {size} ({share:.0%} one label)",
                            hint="use fewer or smaller partitions")
        picks += by[major][taken[major] : taken[major] + n_major]
        taken[major] += n_major
        rest = size - n_major
        pool = [i for c in others for i in by[c][taken[c] :]]
        if len(pool) < rest:
            raise UserError(f"not enough examples for partition {p} of {n} (size {size})", hint="use smaller partitions")
        chosen = rng.sample(pool, rest)
        chosen_set = set(chosen)
        for c in others:  # drop what was chosen from the per-class queues (keeps partitions disjoint)
            remaining = [i for i in by[c][taken[c] :] if i not in chosen_set]
            by[c] = by[c][: taken[c]] + remaining
        picks += chosen
        if p == index:
            result = sorted(picks)
    return result


def _noniid_factory(name: str) -> Task:
    try:
        _, rest = name.split(":", 1)
        task_name, part, size, share, seed = rest.rsplit(":", 4)
        i, n = (int(x) for x in part.split("of"))
        size_i, share_f, seed_i = int(size), float(share), int(seed)
    except ValueError:
        raise UserError(f"bad non-IID task name {name!r}", hint="noniid:<task>:<i>of<n>:<size>:<share>:<seed>") from None
    if not 0 <= i < n:
        raise UserError(f"partition index {i} is outside 0..{n - 1} in {name!r}")
    if not 0 < share_f <= 1:
        raise UserError(f"label share {share_f} must be in (0, 1] in {name!r}")
    base = get_task(task_name)
    if base.problem_type != "single_label_classification":
        raise UserError(f"non-IID partitions need a single-label classification task, not {base.name}")

    def load(task: Task, split: str, data_dir: Path | None):
        ds = base.load(split, data_dir)
        if split != "train":
            return ds
        return ds.select(partition_indices(list(ds["label"]), i, n, size_i, share_f, seed_i))

    return dataclasses.replace(base, name=name, loader=load,
                               description=f"partition {i} of {n} (non-IID, {share_f:.0%} one label) of {base.name}")


def union_name(tasks: list[str], each: int | None = None, seed: int = 42) -> str:
    name = "union:" + "+".join(tasks)
    return name + (f":each={each}:seed={seed}" if each else "")


def _union_factory(name: str) -> Task:
    body = name[len("union:") :]
    each = seed = None
    if ":each=" in body:
        body, opts = body.split(":each=", 1)
        try:
            each_s, seed_s = opts.split(":seed=")
            each, seed = int(each_s), int(seed_s)
        except ValueError:
            raise UserError(f"bad union task name {name!r}", hint="union:<t1>+<t2>[:each=N:seed=S]") from None
    parts = [p for p in body.split("+") if p]
    if len(parts) < 2:
        raise UserError(f"union task {name!r} needs at least two tasks joined by '+'")
    tasks = [get_task(p) for p in parts]
    ref = tasks[0]
    for t in tasks[1:]:
        if t.label_names != ref.label_names or t.problem_type != ref.problem_type:
            raise UserError(f"tasks {ref.name} and {t.name} have different label spaces; a union needs one",
                            hint="multi-task training across label spaces needs one head per task (not supported)")

    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import concatenate_datasets

        from mergekit_lab.data import subsample

        dss = []
        for t in tasks:
            ds = t.load(split, data_dir)
            if split == "train" and each is not None:
                ds = subsample(ds, each, seed)
            dss.append(ds)
        cols = set(dss[0].column_names)
        for d in dss[1:]:
            cols &= set(d.column_names)
        return concatenate_datasets([d.select_columns(sorted(cols)) for d in dss])

    return dataclasses.replace(ref, name=name, loader=load, description=f"union of {', '.join(parts)}")


register_task_prefix("noniid:", _noniid_factory, example="noniid:<task>:<i>of<n>:<size>:<share>:<seed>")
register_task_prefix("union:", _union_factory, example="union:<task>+<task>")
