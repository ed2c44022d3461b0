"""``file:<path>``: the user's own CSV / TSV / JSONL with text and label columns.

``<path>`` is one file (used for every split) or a folder with ``train.*``, ``dev.*`` (or
``validation.*``) and ``test.*``. Text columns: ``text`` (or ``sentence``/``sentence1``) and
optionally ``text_pair`` (or ``sentence2``). Labels: integers or strings are classes (sorted
label space of the training file); floats make a regression task.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mergekit_lab.errors import UserError
from mergekit_lab.tasks._common import read_jsonl
from mergekit_lab.tasks.base import Task, register_task_prefix

FIRST = ("text", "sentence", "sentence1")
SECOND = ("text_pair", "sentence2")
EXTS = (".csv", ".tsv", ".jsonl", ".json")


def read_table(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    delim = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter=delim))


def split_file(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    names = {"train": ["train"], "validation": ["dev", "validation", "valid"], "test": ["test"]}.get(split, [split])
    for n in names:
        for ext in EXTS:
            if (root / f"{n}{ext}").exists():
                return root / f"{n}{ext}"
    raise UserError(f"no {split} file in {str(root)!r}", hint=f"expected one of {', '.join(n + '.csv/.tsv/.jsonl' for n in names)}")


def _columns(rows: list[dict], path: Path) -> tuple[str, str | None]:
    keys = rows[0].keys()
    first = next((c for c in FIRST if c in keys), None)
    if first is None or "label" not in keys:
        raise UserError(f"{path} needs a text column ({'/'.join(FIRST)}) and a 'label' column", hint=f"found: {list(keys)}")
    return first, next((c for c in SECOND if c in keys), None)


def _parse_label(v):
    if isinstance(v, (int, float)):
        return v
    s = str(v).strip()
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return s


def make_file_task(name: str) -> Task:
    root = Path(name[len("file:"):]).expanduser()
    if not root.exists():
        raise UserError(f"data file {str(root)!r} of task {name!r} does not exist", hint="check the path after file:")
    train_path = split_file(root, "train")
    rows = read_table(train_path)
    if not rows:
        raise UserError(f"{train_path} has no rows")
    first, second = _columns(rows, train_path)
    raw = [_parse_label(r["label"]) for r in rows]
    if any(isinstance(v, float) for v in raw) and all(isinstance(v, (int, float)) for v in raw):
        problem, label_names, metrics = "regression", ["score"], ["pearson", "spearman"]
    else:
        problem = "single_label_classification"
        label_names = [str(v) for v in sorted(set(raw), key=lambda x: (isinstance(x, str), x))]
        metrics = ["accuracy", "macro_f1"]

    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import Dataset

        path = split_file(root, split)
        rows = read_table(path)
        texts = [str(r[first]) for r in rows]
        cols = {"text": texts}
        if second:
            cols["text_pair"] = [str(r.get(second, "")) for r in rows]
        labels = []
        for i, r in enumerate(rows):
            v = _parse_label(r.get("label"))
            if problem == "regression":
                labels.append(float(v))
            elif str(v) in label_names:
                labels.append(label_names.index(str(v)))
            else:
                raise UserError(f"label {v!r} in row {i + 1} of {path} is not in the label space {label_names} "
                                f"(taken from {train_path.name})", hint="fix the label or add it to the training file")
        cols["label"] = labels
        return Dataset.from_dict(cols)

    return Task(name=name, problem_type=problem, label_names=label_names,
                text_fields=("text", "text_pair") if second else ("text",), metric_names=metrics, loader=load,
                description=f"user file {root}")


register_task_prefix("file:", make_file_task, example="file:<csv|tsv|jsonl or folder>")
