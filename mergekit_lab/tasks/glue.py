"""GLUE tasks: ``glue/<name>`` from a local GLUE-format folder or the Hub (nyu-mll/glue).

Local layout is the official one (``SST-2/train.tsv``, ``dev.tsv``, ``test.tsv``). Mind the
quirks: CoLA's files have no header; MRPC's have a UTF-8 BOM and quote characters that are
text, so files are read with quoting off; MNLI's dev split is ``dev_matched.tsv``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mergekit_lab.errors import UserError
from mergekit_lab.tasks.base import Task, check_labels, register_task

csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class GlueSpec:
    folder: str
    text_columns: tuple[str, ...]  # column names in the TSV header (or indices for CoLA)
    label_column: str
    header: bool = True
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    problem_type: str = "single_label_classification"
    numeric_labels: bool = True
    split_files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", ("3",), "1", header=False, label_names=("unacceptable", "acceptable"),
                     metrics=("matthews_correlation", "accuracy")),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", label_names=("negative", "positive")),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", label_names=("not_equivalent", "equivalent"),
                     metrics=("accuracy", "f1")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", label_names=("not_duplicate", "duplicate"),
                    metrics=("accuracy", "f1")),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "score", problem_type="regression",
                     metrics=("pearson", "spearman")),
    "mnli": GlueSpec("MNLI", ("sentence1", "sentence2"), "gold_label",
                     label_names=("entailment", "neutral", "contradiction"), numeric_labels=False,
                     split_files=(("train", "train.tsv"), ("validation", "dev_matched.tsv"),
                                  ("validation_matched", "dev_matched.tsv"),
                                  ("validation_mismatched", "dev_mismatched.tsv"), ("test", "test_matched.tsv"))),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "label", label_names=("entailment", "not_entailment"),
                     numeric_labels=False),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), "label", label_names=("entailment", "not_entailment"),
                    numeric_labels=False),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", label_names=("not_entailment", "entailment")),
}

# column names in the Hub dataset (nyu-mll/glue)
HUB_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


def _find_folder(data_dir: Path, folder: str) -> Path | None:
    for cand in (data_dir / folder, data_dir / "glue" / folder, data_dir):
        if (cand / "dev.tsv").exists() or (cand / "train.tsv").exists() or (cand / "dev_matched.tsv").exists():
            if cand == data_dir and data_dir.name.lower() != folder.lower():
                continue
            return cand
    return None


def read_glue_tsv(path: Path, spec: GlueSpec, task: Task):
    """Read one GLUE TSV into (texts per field, labels); labels None for unlabeled test files."""
    texts: list[list[str]] = [[] for _ in spec.text_columns]
    labels: list = []
    has_labels = True
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if not rows:
        return texts, []
    if spec.header:
        header = rows[0]
        rows = rows[1:]
        try:
            text_idx = [header.index(c) for c in spec.text_columns]
        except ValueError:
            raise UserError(f"{path} does not have the GLUE columns {list(spec.text_columns)} of {task.name}",
                            hint=f"header found: {header}") from None
        label_idx = header.index(spec.label_column) if spec.label_column in header else None
        if label_idx is None:
            has_labels = False
    else:
        text_idx = [int(c) for c in spec.text_columns]
        label_idx = int(spec.label_column)
        # CoLA test files: "index<TAB>sentence" with a header line
        if rows and rows[0] and rows[0][0] == "index":
            rows = rows[1:]
            text_idx, label_idx, has_labels = [1], None, False
    for lineno, row in enumerate(rows, start=2 if spec.header else 1):
        if not row or all(not c for c in row):
            continue
        try:
            for k, i in enumerate(text_idx):
                texts[k].append(row[i])
            if has_labels:
                labels.append(row[label_idx])  # type: ignore[index]
        except IndexError:
            raise UserError(f"line {lineno} of {path} has {len(row)} columns, fewer than expected for {task.name}",
                            hint="the file may be truncated or not in GLUE format") from None
    if not has_labels:
        return texts, None
    out_labels: list = []
    for i, raw in enumerate(labels):
        raw = raw.strip()
        if spec.problem_type == "regression":
            try:
                out_labels.append(float(raw))
            except ValueError:
                raise UserError(f"score {raw!r} on data line {i + 1} of {path} is not a number") from None
        elif spec.numeric_labels and raw.lstrip("-").isdigit():
            out_labels.append(int(raw))
        elif raw in spec.label_names:
            out_labels.append(spec.label_names.index(raw))
        else:
            out_labels.append(raw)
    check_labels(task, out_labels, str(path))
    return texts, out_labels


def _make_loader(key: str, spec: GlueSpec):
    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import Dataset

        if data_dir is not None:
            if not data_dir.exists():
                raise UserError(f"data folder {str(data_dir)!r} does not exist", hint="check --data-dir")
            folder = _find_folder(data_dir, spec.folder)
            files = dict(spec.split_files)
            if folder is None:
                raise UserError(
                    f"no {spec.folder} files under {str(data_dir)!r} for {task.name}",
                    hint=f"expected {spec.folder}/{files['train']}, {spec.folder}/{files['validation']} (GLUE layout)",
                )
            if split not in files:
                raise UserError(f"task {task.name} has no split {split!r}", hint=f"splits: {', '.join(files)}")
            path = folder / files[split]
            if not path.exists():
                raise UserError(f"missing file {str(path)!r} for split {split!r} of {task.name}",
                                hint=f"expected files: {', '.join(sorted(set(files.values())))}")
            texts, labels = read_glue_tsv(path, spec, task)
            if labels is None:
                raise UserError(f"{str(path)!r} has no labels (GLUE test files are unlabeled)",
                                hint="evaluate on --split validation")
            cols = {name: texts[i] for i, name in enumerate(task.text_fields)}
            cols["label"] = labels
            return Dataset.from_dict(cols)
        return _load_hub(key, task, split)

    return load


def _load_hub(key: str, task: Task, split: str):  # pragma: no cover - needs the network
    import datasets

    hub_split = {"validation": "validation_matched" if key == "mnli" else "validation"}.get(split, split)
    try:
        ds = datasets.load_dataset("nyu-mll/glue", key, split=hub_split)
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds
        raise UserError(f"could not load {task.name} split {split!r} from the Hub: {type(e).__name__}: {e}",
                        hint="pass --data-dir with a local GLUE folder when offline") from None
    cols = HUB_COLUMNS[key]
    ds = ds.rename_columns({c: f for c, f in zip(cols, task.text_fields) if c != f})
    keep = [*task.text_fields, "label"]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    if split == "test" or (len(ds) and ds[0]["label"] == -1):
        raise UserError(f"the Hub's {task.name} {split} split has no labels", hint="evaluate on validation")
    return ds


for _key, _spec in SPECS.items():
    fields = ("sentence",) if len(_spec.text_columns) == 1 else ("sentence1", "sentence2")
    register_task(
        Task(
            name=f"glue/{_key}",
            problem_type=_spec.problem_type,
            label_names=list(_spec.label_names) if _spec.problem_type != "regression" else ["score"],
            text_fields=fields,
            metric_names=list(_spec.metrics),
            loader=_make_loader(_key, _spec),
            splits=tuple(dict(_spec.split_files)),
            description=f"GLUE {_spec.folder}",
        )
    )
