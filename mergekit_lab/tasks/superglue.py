"""SuperGLUE: ``superglue/<boolq|cb|copa|multirc|record|rte|wic|wsc>``.

Local files first: ``--data-dir`` holding the official SuperGLUE folders (``BoolQ/``, ``CB/``,
``COPA/``, ``MultiRC/``, ``ReCoRD/``, ``RTE/``, ``WiC/``, ``WSC/``, each with ``train.jsonl``,
``val.jsonl``, ``test.jsonl``; also accepted under ``super_glue/`` or ``superglue/``); without
``--data-dir`` the Hub dataset ``aps/super_glue`` is used. Test files carry no labels.

Every task is sentence(-pair) classification with the encoder's classification head:

=========  ==================================================  ============================  ==================
task       text pair                                           labels                        metrics
=========  ==================================================  ============================  ==================
boolq      question / passage                                  False, True                   accuracy
cb         premise / hypothesis                                entailment, contradiction,    accuracy, macro_f1
                                                               neutral
copa       "premise What was the cause|effect?" /              choice1, choice2              accuracy
           "choice1 [or] choice2"  (pick one of two)
multirc    paragraph / "question answer"                       False, True (per answer)      f1a, em
record     passage / query with @placeholder filled by one     False, True (per candidate)   f1, exact_match
           candidate entity; the best-scoring candidate
           per query is the prediction
rte        premise / hypothesis                                entailment, not_entailment    accuracy
wic        "word: sentence1" / sentence2                       False, True                   accuracy
wsc        text / "pronoun refers to noun"                     False, True                   accuracy
=========  ==================================================  ============================  ==================

MultiRC: F1a is binary F1 over all answer options; EM is the share of questions whose options
are all right. ReCoRD: max-over-gold EM / token F1 with SQuAD normalisation (fractions).

Without ``--max-seq-length`` BoolQ, MultiRC and ReCoRD use 256 tokens (their passages are
paragraphs: a 128-token window cuts most of them), the other tasks 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergekit_lab.errors import UserError
from mergekit_lab.evaluation.metrics_extra import (
    max_over_ground_truths,
    multirc_scores,
    squad_exact,
    squad_f1,
)
from mergekit_lab.tasks._common import find_folder, hub_dataset, read_jsonl, split_path
from mergekit_lab.tasks.base import Task, register_task

SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
FOLDERS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD", "rte": "RTE",
           "wic": "WiC", "wsc": "WSC"}
BOOL = ["False", "True"]
LONG_PASSAGES = {"boolq": 256, "multirc": 256, "record": 256}  # default max_seq_length


@dataclass(frozen=True)
class Spec:
    labels: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy",)


SPECS = {
    "boolq": Spec(tuple(BOOL)),
    "cb": Spec(("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1")),
    "copa": Spec(("choice1", "choice2")),
    "multirc": Spec(tuple(BOOL), ("f1a", "em")),
    "record": Spec(tuple(BOOL), ("f1", "exact_match")),
    "rte": Spec(("entailment", "not_entailment")),
    "wic": Spec(tuple(BOOL)),
    "wsc": Spec(tuple(BOOL)),
}


def _label(value, names: tuple[str, ...], where: str):
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if 0 <= value < len(names):
            return value
        if value == -1:
            return None  # Hub test split
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise UserError(f"label {value!r} in {where} is not one of {', '.join(names)}")


def _record_text(text: str) -> str:
    return text.replace("@highlight\n", "- ")


def convert(key: str, rec: dict, where: str) -> list[dict]:
    """One official SuperGLUE JSONL record -> rows {sentence1, sentence2, label[, group, candidate, answers]}."""
    names = SPECS[key].labels
    lab = _label(rec.get("label"), names, where) if key not in ("multirc", "record") else None
    if key == "boolq":
        return [{"sentence1": rec["question"], "sentence2": rec["passage"], "label": lab}]
    if key in ("cb", "rte"):
        return [{"sentence1": rec["premise"], "sentence2": rec["hypothesis"], "label": lab}]
    if key == "copa":
        q = {"cause": "What was the cause?", "effect": "What happened as a result?"}.get(rec["question"], rec["question"])
        return [{"sentence1": f"{rec['premise']} {q}", "sentence2": f"{rec['choice1']} [or] {rec['choice2']}",
                 "label": lab}]
    if key == "wic":
        return [{"sentence1": f"{rec['word']}: {rec['sentence1']}", "sentence2": rec["sentence2"], "label": lab}]
    if key == "wsc":
        t = rec["target"]
        return [{"sentence1": rec["text"], "sentence2": f"{t['span2_text']} refers to {t['span1_text']}", "label": lab}]
    if key == "multirc":
        rows = []
        p = rec["passage"]
        for q in p["questions"]:
            for a in q["answers"]:
                rows.append({"sentence1": p["text"], "sentence2": f"{q['question']} {a['text']}",
                             "label": _label(a.get("label"), names, where),
                             "group": f"{rec.get('idx')}-{q.get('idx')}", "candidate": "", "answers": []})
        return rows
    if key == "record":
        rows = []
        p = rec["passage"]
        text = p["text"]
        cands = list(dict.fromkeys(text[e["start"]: e["end"] + 1] for e in p["entities"]))
        for q in rec["qas"]:
            golds = [a["text"] for a in q.get("answers", [])]
            for c in cands:
                rows.append({"sentence1": _record_text(text), "sentence2": q["query"].replace("@placeholder", c),
                             "label": int(c in golds) if golds else None,
                             "group": str(q.get("idx")), "candidate": c, "answers": golds})
        return rows
    raise KeyError(key)


def _hub_rows(key: str, split: str, task_name: str) -> list[dict]:  # pragma: no cover - network
    config = "wsc.fixed" if key == "wsc" else key
    ds = hub_dataset("aps/super_glue", config, split, task_name)
    rows: list[dict] = []
    names = SPECS[key].labels
    for r in ds:
        if key == "multirc":
            rows.append({"sentence1": r["paragraph"], "sentence2": f"{r['question']} {r['answer']}",
                         "label": _label(r["label"], names, task_name),
                         "group": f"{r['idx']['paragraph']}-{r['idx']['question']}", "candidate": "", "answers": []})
        elif key == "record":
            for c in dict.fromkeys(r["entities"]):
                rows.append({"sentence1": _record_text(r["passage"]), "sentence2": r["query"].replace("@placeholder", c),
                             "label": int(c in r["answers"]) if r["answers"] else None,
                             "group": f"{r['idx']['passage']}-{r['idx']['query']}", "candidate": c,
                             "answers": list(r["answers"])})
        elif key == "wsc":
            rows += convert(key, {"text": r["text"], "target": {"span1_text": r["span1_text"],
                                                                 "span2_text": r["span2_text"]}, "label": r["label"]},
                            task_name)
        elif key == "copa":
            rows += convert(key, dict(r), task_name)
        else:
            rows += convert(key, dict(r), task_name)
    return rows


def _loader(key: str):
    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import Dataset

        if data_dir is None:
            rows = _hub_rows(key, split, task.name)
        else:
            folder = find_folder(data_dir, [FOLDERS[key], f"super_glue/{FOLDERS[key]}", f"superglue/{FOLDERS[key]}",
                                            f"SuperGLUE/{FOLDERS[key]}"], task.name, list(SPLIT_FILES.values()))
            path = split_path(folder, split, SPLIT_FILES, task.name)
            rows = []
            for i, rec in enumerate(read_jsonl(path), 1):
                try:
                    rows += convert(key, rec, f"line {i} of {path}")
                except KeyError as e:
                    raise UserError(f"line {i} of {path} lacks field {e.args[0]!r} of SuperGLUE {key}",
                                    hint="use the official SuperGLUE JSONL files") from None
        if rows and any(r["label"] is None for r in rows):
            raise UserError(f"split {split!r} of {task.name} has no labels (SuperGLUE test files are unlabeled)",
                            hint="evaluate on --split validation")
        cols = {k: [r[k] for r in rows] for k in (rows[0] if rows else {"sentence1": 0, "sentence2": 0, "label": 0})}
        return Dataset.from_dict(cols)

    return load


class GroupedTask(Task):
    """MultiRC / ReCoRD: rows are scored per answer option / candidate, metrics per question."""

    def encode(self, ds, tokenizer, max_seq_length: int):
        from mergekit_lab.data import encode

        enc = encode(self, ds.remove_columns([c for c in ("group", "candidate", "answers") if c in ds.column_names]),
                     tokenizer, max_seq_length)
        for c in ("group", "candidate", "answers"):
            enc = enc.add_column(c, ds[c])
        return enc

    def compute_grouped(self, logits: np.ndarray, labels: np.ndarray, encoded) -> dict[str, float]:
        groups = encoded["group"]
        if self.name.endswith("multirc"):
            return multirc_scores(logits.argmax(-1), labels, groups)
        score = logits[:, 1] - logits[:, 0]
        best: dict[str, tuple[float, int]] = {}
        for i, g in enumerate(groups):
            if g not in best or score[i] > best[g][0]:
                best[g] = (float(score[i]), i)
        cands, answers = encoded["candidate"], encoded["answers"]
        em = [max_over_ground_truths(squad_exact, cands[i], answers[i]) for _, i in best.values()]
        f1 = [max_over_ground_truths(squad_f1, cands[i], answers[i]) for _, i in best.values()]
        return {"f1": float(np.mean(f1)), "exact_match": float(np.mean(em))}

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64, description: str = "eval"):
        from mergekit_lab.evaluation.evaluate import predict

        logits, labels, _ = predict(model, encoded, self.collator(tokenizer), None, batch_size, description)
        return self.compute_grouped(logits, labels, encoded)


for _key, _spec in SPECS.items():
    cls = GroupedTask if _key in ("multirc", "record") else Task
    _task = register_task(cls(name=f"superglue/{_key}", problem_type="single_label_classification",
                              label_names=list(_spec.labels), text_fields=("sentence1", "sentence2"),
                              metric_names=list(_spec.metrics), loader=_loader(_key), splits=tuple(SPLIT_FILES),
                              description=f"SuperGLUE {FOLDERS[_key]}"))
    if _key in LONG_PASSAGES:
        _task.default_max_seq_length = LONG_PASSAGES[_key]
