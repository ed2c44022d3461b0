"""Unified multi-label emotion data (the RegMean paper's emotion setting): ``emotion/<domain>``.

JSONL records hold ``text``, ``emotions`` (13 keys, 0/1 or null where the domain does not
annotate the emotion) and ``VAD`` (valence/arousal/dominance on EmoBank's 1-5 scale, or null).
The head has 16 outputs: the 13 emotions plus V, A, D, each binarised as ``score > 3.0`` (above
the scale's neutral midpoint; documented in the README). Labels a domain does not annotate are
masked out of the loss (``label_mask``) and out of the metric (macro-F1 over the labels present).
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_lab.errors import UserError
from mergekit_lab.tasks.base import Task, register_task, register_task_prefix

EMOTIONS = ["joy", "anger", "sadness", "disgust", "fear", "trust", "surprise", "love", "noemo",
            "confusion", "anticipation", "shame", "guilt"]
VAD = ["valence", "arousal", "dominance"]
LABELS = EMOTIONS + VAD
DOMAINS = ["crowdflower", "dair-ai-emotion", "emobank", "emoint", "isear", "tec"]
VAD_THRESHOLD = 3.0
SPLIT_FILES = {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}


def encode_record(rec: dict, where: str) -> tuple[list[float], list[float]]:
    labels, mask = [], []
    emos = rec.get("emotions") or {}
    vad = rec.get("VAD") or {}
    for name in EMOTIONS:
        v = emos.get(name)
        if v is None:
            labels.append(0.0)
            mask.append(0.0)
        elif v in (0, 1):
            labels.append(float(v))
            mask.append(1.0)
        else:
            raise UserError(f"emotion {name!r}={v!r} in {where} is not 0, 1 or null")
    for name in VAD:
        v = vad.get(name)
        if v is None:
            labels.append(0.0)
            mask.append(0.0)
        else:
            labels.append(1.0 if float(v) > VAD_THRESHOLD else 0.0)
            mask.append(1.0)
    return labels, mask


def _find(data_dir: Path, domain: str) -> Path | None:
    for cand in (data_dir / domain, data_dir / "emotion" / domain):
        if cand.is_dir():
            return cand
    return None


def _loader(domain: str):
    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import Dataset

        if data_dir is None:
            raise UserError(f"{task.name} needs local files", hint="pass --data-dir with the unified emotion folder")
        folder = _find(data_dir, domain)
        if folder is None:
            raise UserError(f"no {domain}/ folder under {str(data_dir)!r} for {task.name}",
                            hint=f"expected {domain}/train.jsonl, {domain}/dev.jsonl, {domain}/test.jsonl")
        if split not in SPLIT_FILES:
            raise UserError(f"task {task.name} has no split {split!r}", hint="splits: train, validation, test")
        path = folder / SPLIT_FILES[split]
        if not path.exists():
            raise UserError(f"missing file {str(path)!r}", hint=f"expected {', '.join(SPLIT_FILES.values())}")
        texts, labels, masks = [], [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"line {lineno} of {path} is not JSON: {e.msg}") from None
                if "text" not in rec:
                    raise UserError(f"line {lineno} of {path} has no 'text' field")
                y, m = encode_record(rec, f"line {lineno} of {path}")
                texts.append(rec["text"])
                labels.append(y)
                masks.append(m)
        return Dataset.from_dict({"text": texts, "label": labels, "label_mask": masks})

    return load


def _make(domain: str) -> Task:
    return Task(
        name=f"emotion/{domain}",
        problem_type="multi_label_classification",
        label_names=list(LABELS),
        text_fields=("text",),
        metric_names=["macro_f1"],
        loader=_loader(domain),
        description=f"unified emotion, domain {domain} (16 multi-label outputs)",
    )


for _d in DOMAINS:
    register_task(_make(_d))


def _factory(name: str) -> Task:
    domain = name.split("/", 1)[1]
    if not domain:
        raise UserError(f"task {name!r} names no emotion domain", hint=f"domains: {', '.join(DOMAINS)}")
    return _make(domain)


register_task_prefix("emotion/", _factory, example="emotion/<domain>")
