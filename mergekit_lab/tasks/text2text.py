"""Text-to-text versions of classification tasks for encoder-decoder models (T5): ``t2t/<task>``.

``t2t/glue/sst2`` reads the same data as ``glue/sst2`` and turns each example into a source
and a target string (T5 style):

- source: ``<short name> <field>: <text> [<field2>: <text2>]``, the short name being the last
  part of the task name, e.g. ``sst2 sentence: a gripping film`` or
  ``rte sentence1: ... sentence2: ...``;
- target: the label word (the task's label name, lower-cased: ``positive``, ``not_entailment``,
  ``true``); regression (STS-B) targets are the score rounded to 0.2 (``3.8``).

Multi-label emotion tasks (``t2t/emotion/<domain>``) use the RegMean paper's T5 format: one
yes/no question per annotated label, source ``does the sentence express <label>? <extra_id_0>
<text>`` and target ``<extra_id_0> yes`` or ``<extra_id_0> no``; answers are put back into the
16-label matrix and scored with the emotion task's masked macro-F1.

Training uses the seq2seq cross-entropy of the target. Evaluation generates greedily (at most
the longest target + 2 tokens), decodes without special tokens, lower-cases and strips, and
maps the text back to a label. An invalid generation (no label word) counts as wrong: a class
task gets a wrong class ((gold + 1) mod n), a yes/no question the opposite answer, a regression
task the end of the 0-5 scale farthest from the gold score. ``invalid_rate`` reports their share.
SuperGLUE ReCoRD has no text-to-text form here (use ``superglue/record``).
"""

from __future__ import annotations

import re

import numpy as np

from mergekit_lab.errors import UserError
from mergekit_lab.tasks._common import (
    build_auto_model,
    eval_mode,
    iter_batches,
    load_auto_model,
    pad_collator,
)
from mergekit_lab.tasks.base import Task, canonical_split, get_task, register_task_prefix

IGNORE = -100
SENTINEL = "<extra_id_0>"
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def label_word(name: str) -> str:
    return name.lower()


def source_text(prefix: str, fields: tuple[str, ...], row: dict) -> str:
    return " ".join([prefix] + [f"{f}: {row[f]}" for f in fields if row.get(f) is not None])


def emotion_question(label: str, text: str) -> str:
    return f"does the sentence express {label}? {SENTINEL} {text}"


class Text2TextTask(Task):
    """A classification / regression / multi-label task as source -> target strings."""

    def __init__(self, name: str, inner: Task):
        if inner.family != "classification":
            raise UserError(f"{inner.name} ({inner.family}) has no text-to-text form",
                            hint="t2t/ wraps classification tasks: glue/*, superglue/* (not record), emotion/*, ...")
        if inner.name.endswith("superglue/record"):
            raise UserError("superglue/record has no text-to-text form here", hint="use superglue/record")
        super().__init__(name=name, problem_type=inner.problem_type, label_names=list(inner.label_names),
                         text_fields=inner.text_fields, metric_names=[*inner.metric_names, "invalid_rate"],
                         loader=None, family="seq2seq", greater_is_better=inner.greater_is_better,  # type: ignore[arg-type]
                         splits=inner.splits, description=f"text-to-text {inner.name}")
        self.inner = inner
        self.prefix = inner.name.rsplit("/", 1)[-1]
        self.default_max_seq_length = inner.default_max_seq_length

    @property
    def words(self) -> list[str]:
        if self.problem_type == "multi_label_classification":
            return ["no", "yes"]
        return [label_word(n) for n in self.label_names]

    # -- data --
    def load(self, split, data_dir=None):
        return self.inner.load(canonical_split(split), data_dir)

    def to_pairs(self, ds) -> dict[str, list]:
        """Source/target strings plus what evaluation needs to map answers back."""
        cols: dict[str, list] = {"source": [], "target": [], "gold": [], "example": [], "label_index": []}
        extra = [c for c in ("group", "candidate", "answers") if c in ds.column_names]
        for c in extra:
            cols[c] = []
        mask_col = "label_mask" in ds.column_names
        for i, row in enumerate(ds):
            if self.problem_type == "multi_label_classification":
                mask = row["label_mask"] if mask_col else [1.0] * len(row["label"])
                text = row[self.text_fields[0]]
                for j, (y, m) in enumerate(zip(row["label"], mask)):
                    if m:
                        self._append(cols, emotion_question(self.label_names[j], text),
                                     f"{SENTINEL} {'yes' if y > 0.5 else 'no'}", float(y > 0.5), i, j)
            elif self.problem_type == "regression":
                score = float(row["label"])
                self._append(cols, source_text(self.prefix, self.text_fields, row), f"{round(score * 5) / 5:.1f}",
                             score, i, 0)
            else:
                y = int(row["label"])
                self._append(cols, source_text(self.prefix, self.text_fields, row), self.words[y], float(y), i, 0)
            for c in extra:
                cols[c].append(row[c])
        return cols

    @staticmethod
    def _append(cols, source, target, gold, example, label_index) -> None:
        cols["source"].append(source)
        cols["target"].append(target)
        cols["gold"].append(gold)
        cols["example"].append(example)
        cols["label_index"].append(label_index)

    def encode(self, ds, tokenizer, max_seq_length: int):
        from datasets import Dataset

        pairs = Dataset.from_dict(self.to_pairs(ds))

        def fn(batch):
            enc = tokenizer(batch["source"], truncation=True, max_length=max_seq_length)
            tgt = tokenizer(text_target=batch["target"], truncation=True, max_length=32)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": tgt["input_ids"]}

        enc = pairs.map(fn, batched=True)
        if self.problem_type == "multi_label_classification":
            enc = enc.add_column("n_examples", [len(ds)] * len(enc)) if len(enc) else enc
        return enc

    def collator(self, tokenizer):
        return pad_collator(tokenizer, {"input_ids": None, "attention_mask": 0, "labels": IGNORE})

    # -- model --
    def build_model(self, model_settings, *, seed: int = 42, tokenizer=None):
        from transformers import AutoModelForSeq2SeqLM

        return build_auto_model(AutoModelForSeq2SeqLM, model_settings, seed=seed, tokenizer=tokenizer)

    def load_trained(self, path: str, *, trust_remote_code: bool = False):
        from transformers import AutoModelForSeq2SeqLM

        return load_auto_model(AutoModelForSeq2SeqLM, path, trust_remote_code=trust_remote_code)

    def check_model(self, model, name: str) -> None:
        if not getattr(model.config, "is_encoder_decoder", False):
            raise UserError(f"model {name!r} is not an encoder-decoder model", hint="t2t/ tasks need T5-like models")

    def compute_loss(self, model, batch):
        return model(**batch).loss

    # -- evaluation --
    def parse(self, text: str, gold: float) -> tuple[float, bool]:
        """(prediction, valid) for one generated string; invalid ones are made wrong."""
        t = " ".join(text.replace(SENTINEL, " ").lower().split())
        if self.problem_type == "regression":
            m = _NUMBER.search(t)
            if m:
                return float(m.group(0)), True
            return (0.0 if gold > 2.5 else 5.0), False
        words = self.words
        if t in words:
            return float(words.index(t)), True
        if self.problem_type == "multi_label_classification":
            return 1.0 - gold, False
        return float((int(gold) + 1) % len(words)), False

    def generate(self, model, encoded, tokenizer, *, batch_size: int = 64, description: str = "eval") -> list[str]:
        max_new = max(len(tokenizer(text_target=w)["input_ids"]) for w in (self.words if self.problem_type !=
                                                                           "regression" else ["5.0"]))
        if self.problem_type == "multi_label_classification":
            max_new += len(tokenizer(text_target=SENTINEL, add_special_tokens=False)["input_ids"])
        out: list[str] = []
        with eval_mode(model):
            for batch, _ in iter_batches(model, encoded, self.collator(tokenizer), batch_size, description):
                batch.pop("labels", None)
                gen = model.generate(**batch, max_new_tokens=max_new + 2, do_sample=False, num_beams=1)
                out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
        return out

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64, description: str = "eval"):
        texts = self.generate(model, encoded, tokenizer, batch_size=batch_size, description=description)
        return self.score(texts, encoded)

    def score(self, texts: list[str], encoded) -> dict[str, float]:
        """Metrics of generated strings against an encoded split (invalid generations are wrong)."""
        gold = np.asarray(encoded["gold"], dtype=np.float64)
        parsed = [self.parse(t, g) for t, g in zip(texts, gold)]
        preds = np.asarray([p for p, _ in parsed])
        invalid = float(np.mean([not v for _, v in parsed])) if parsed else 0.0
        from mergekit_lab.evaluation.metrics import compute

        if self.problem_type == "multi_label_classification":
            n = int(encoded[0]["n_examples"]) if len(encoded) else 0
            k = len(self.label_names)
            ex, lab = np.asarray(encoded["example"]), np.asarray(encoded["label_index"])
            pm, gm, mm = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k))
            pm[ex, lab], gm[ex, lab], mm[ex, lab] = preds, gold, 1.0
            metrics = {m: compute(m, pm.astype(np.int64), gm.astype(np.int64), mm) for m in self.inner.metric_names}
        elif self.problem_type == "regression":
            metrics = {m: compute(m, preds, gold) for m in self.inner.metric_names}
        elif hasattr(self.inner, "compute_grouped"):
            onehot = np.eye(len(self.label_names))[preds.astype(int)]
            metrics = self.inner.compute_grouped(onehot, gold.astype(int), encoded)
        else:
            metrics = {m: compute(m, preds.astype(int), gold.astype(int)) for m in self.inner.metric_names}
        metrics["invalid_rate"] = invalid
        return metrics


def make_t2t_task(name: str) -> Task:
    inner_name = name[len("t2t/"):]
    if not inner_name:
        raise UserError(f"task {name!r} names no inner task", hint="e.g. t2t/glue/sst2, t2t/emotion/isear")
    return Text2TextTask(name, get_task(inner_name))


register_task_prefix("t2t/", make_t2t_task, example="t2t/<classification task>")
