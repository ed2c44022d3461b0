"""Extractive question answering: ``qa/squad`` and the MRQA 2019 sets ``qa/mrqa-<subset>``.

``qa/squad`` reads SQuAD v1.1 JSON from ``--data-dir``: ``train-v1.1.json`` (or any
``train*.json``, e.g. ``train-subset-500.json``) and ``dev-v1.1.json`` (validation and test),
directly in the folder or in ``squad/``; without ``--data-dir`` it loads ``rajpurkar/squad``
from the Hub. ``qa/mrqa-<subset>`` (squad, newsqa, triviaqa-web, searchqa, hotpotqa,
naturalquestionsshort, ...) loads ``mrqa-workshop/mrqa`` from the Hub, filtered by subset.
``qa/file:<path>`` reads SQuAD-format JSON (one file for every split, or a folder).

Long contexts are split into overlapping windows (question + context chunk) of
``--max-seq-length`` tokens (QA tasks default to 384, the standard BERT SQuAD setting, when the
flag is not given; an explicit value, 128 included, is used as is), with a stride (overlap) of
128 tokens, capped at a third of the window for short windows. Training features whose window does not contain the whole answer point at the
first ([CLS]) token. Prediction takes, over every window of an example, the best-scoring span
(start logit + end logit; top-20 starts and ends; inside the context; end >= start; at most 30
tokens) and reads the answer from the context by character offsets. Exact match and F1 follow
the official SQuAD v1.1 script (see ``mergekit_lab.evaluation.metrics_extra``), as fractions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mergekit_lab.errors import UserError
from mergekit_lab.evaluation.metrics_extra import squad_scores
from mergekit_lab.tasks._common import (
    build_auto_model,
    eval_mode,
    find_folder,
    hub_dataset,
    iter_batches,
    load_auto_model,
    pad_collator,
)
from mergekit_lab.tasks.base import (
    Task,
    canonical_split,
    register_task,
    register_task_prefix,
    resolve_data_dir,
)

QA_MAX_LEN = 384  # QaTask.default_max_seq_length
QA_STRIDE = 128
N_BEST = 20
MAX_ANSWER_TOKENS = 30


def window_params(max_seq_length: int) -> tuple[int, int]:
    """(window length, overlap) for a resolved ``--max-seq-length``."""
    length = int(max_seq_length)
    return length, min(QA_STRIDE, length // 3)


def read_squad_json(path: Path) -> dict[str, list]:
    """SQuAD v1.1 JSON -> columns id, question, context, answer_texts, answer_starts."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON: {e.msg} (line {e.lineno})", hint="give SQuAD v1.1 JSON files") from None
    if not isinstance(data, dict) or "data" not in data:
        raise UserError(f"{path} has no 'data' list", hint="expected the SQuAD v1.1 layout {version, data: [...]}")
    cols: dict[str, list] = {"id": [], "question": [], "context": [], "answer_texts": [], "answer_starts": []}
    for art in data["data"]:
        for para in art.get("paragraphs", []):
            ctx = para["context"]
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                cols["id"].append(str(qa["id"]))
                cols["question"].append(qa["question"])
                cols["context"].append(ctx)
                cols["answer_texts"].append([a["text"] for a in answers])
                cols["answer_starts"].append([int(a["answer_start"]) for a in answers])
    return cols


def _squad_files(folder: Path, split: str, task_name: str) -> Path:
    if split == "train":
        names = ["train-v1.1.json", "train.json"] + sorted(p.name for p in folder.glob("train*.json"))
    elif split in ("validation", "test"):
        names = ["dev-v1.1.json", "dev.json", "validation.json"] + (["test.json"] if split == "test" else [])
    else:
        raise UserError(f"task {task_name} has no split {split!r}", hint="splits: train, validation, test")
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise UserError(f"no SQuAD {split} file in {str(folder)!r} for {task_name}",
                    hint="expected train-v1.1.json (or train*.json) and dev-v1.1.json")


def _squad_loader(task: QaTask, split: str, data_dir: Path | None):
    if data_dir is None:
        return _hub_squad(task, split)
    folder = find_folder(data_dir, ["squad", "SQuAD"], task.name,
                         ["train-v1.1.json", "dev-v1.1.json", "train-subset-500.json", "train.json", "dev.json"])
    return read_squad_json(_squad_files(folder, split, task.name))


def _file_loader(root: Path):
    def load(task: QaTask, split: str, data_dir: Path | None):
        if root.is_file():
            return read_squad_json(root)
        return read_squad_json(_squad_files(root, split, task.name))

    return load


def _hub_squad(task: QaTask, split: str):  # pragma: no cover - network
    ds = hub_dataset("rajpurkar/squad", None, "train" if split == "train" else "validation", task.name)
    return {"id": ds["id"], "question": ds["question"], "context": ds["context"],
            "answer_texts": [a["text"] for a in ds["answers"]], "answer_starts": [a["answer_start"] for a in ds["answers"]]}


def _mrqa_loader(subset: str):
    def load(task: QaTask, split: str, data_dir: Path | None):  # pragma: no cover - network
        ds = hub_dataset("mrqa-workshop/mrqa", None, "train" if split == "train" else "validation", task.name)
        ds = ds.filter(lambda s: s.lower().replace("_", "").replace("-", "") == subset, input_columns="subset")
        cols: dict[str, list] = {"id": [], "question": [], "context": [], "answer_texts": [], "answer_starts": []}
        for r in ds:
            cols["id"].append(r["qid"])
            cols["question"].append(r["question"])
            cols["context"].append(r["context"])
            spans = r["detected_answers"]
            cols["answer_texts"].append(list(r["answers"]))
            cols["answer_starts"].append([c[0] for c in spans["char_spans"]] if spans else [])
        return cols

    return load


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: list, *, n_best: int = N_BEST,
              max_answer_tokens: int = MAX_ANSWER_TOKENS) -> tuple[float, int, int] | None:
    """(score, start char, end char) of the best valid span in one window; offsets are None
    (or [-1, -1]) outside the context."""
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    best = None
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or not _in_ctx(offsets[s]) or not _in_ctx(offsets[e]):
                continue
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(offsets[s][0]), int(offsets[e][1]))
    return best


def _in_ctx(off) -> bool:
    return off is not None and off[0] >= 0 and off[1] > off[0]


def postprocess(features: list[dict], start_logits: list[np.ndarray], end_logits: list[np.ndarray],
                contexts: dict[str, str]) -> dict[str, str]:
    """Best answer text per example id over all of its windows ('' when no valid span)."""
    best: dict[str, tuple[float, str]] = {}
    for f, sl, el in zip(features, start_logits, end_logits):
        ex = f["example_id"]
        span = best_span(np.asarray(sl), np.asarray(el), f["offset_mapping"])
        if span is not None and (ex not in best or span[0] > best[ex][0]):
            best[ex] = (span[0], contexts[ex][span[1]:span[2]])
        best.setdefault(ex, (-np.inf, ""))
    return {k: v[1] for k, v in best.items()}


class QaTask(Task):
    """Span extraction over (question, context) with a sliding window."""

    default_max_seq_length = QA_MAX_LEN
    supports_k_shot = False  # answers are spans, not classes

    def __init__(self, name: str, reader, description: str = ""):
        super().__init__(name=name, problem_type="single_label_classification", label_names=["start", "end"],
                         text_fields=("question", "context"), metric_names=["f1", "exact_match"],
                         loader=None, family="question_answering", description=description)  # type: ignore[arg-type]
        self.reader = reader

    def load(self, split, data_dir=None):
        from datasets import Dataset

        split = canonical_split(split)
        cols = self.reader(self, split, resolve_data_dir(data_dir))
        if not cols["id"]:
            raise UserError(f"split {split!r} of task {self.name!r} is empty", hint="check the data files")
        return Dataset.from_dict(cols)

    def encode(self, ds, tokenizer, max_seq_length: int):
        """Windows with start/end positions (training) plus example id, context offsets, context
        and gold answers (evaluation)."""
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{self.name} needs a fast tokenizer (offset mappings)")
        length, stride = window_params(max_seq_length)
        pad_right = getattr(tokenizer, "padding_side", "right") == "right"

        def fn(batch):
            questions = [q.lstrip() for q in batch["question"]]
            enc = tokenizer(questions if pad_right else batch["context"], batch["context"] if pad_right else questions,
                            truncation="only_second" if pad_right else "only_first", max_length=length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
            sample_map = enc.pop("overflow_to_sample_mapping")
            ctx_id = 1 if pad_right else 0
            out = {k: [] for k in ("start_positions", "end_positions", "example_id", "offset_mapping",
                                   "context", "answer_texts")}
            for i, offsets in enumerate(enc["offset_mapping"]):
                seq_ids = enc.sequence_ids(i)
                ex = sample_map[i]
                offs = [list(o) if seq_ids[k] == ctx_id else [-1, -1] for k, o in enumerate(offsets)]
                s_pos = e_pos = 0
                texts, starts = batch["answer_texts"][ex], batch["answer_starts"][ex]
                if texts:
                    a_start = starts[0]
                    a_end = a_start + len(texts[0])
                    ctx_tokens = [k for k, s in enumerate(seq_ids) if s == ctx_id]
                    if ctx_tokens and offs[ctx_tokens[0]][0] <= a_start and offs[ctx_tokens[-1]][1] >= a_end:
                        s_pos = next(k for k in ctx_tokens if offs[k][1] > a_start)
                        e_pos = next(k for k in reversed(ctx_tokens) if offs[k][0] < a_end)
                out["start_positions"].append(s_pos)
                out["end_positions"].append(e_pos)
                out["example_id"].append(batch["id"][ex])
                out["offset_mapping"].append(offs)
                out["context"].append(batch["context"][ex])
                out["answer_texts"].append(texts)
            enc.pop("offset_mapping")
            out.update({k: v for k, v in enc.items()})
            return out

        return ds.map(fn, batched=True, remove_columns=ds.column_names)

    def collator(self, tokenizer):
        return pad_collator(tokenizer, {"input_ids": None, "attention_mask": 0, "token_type_ids": 0,
                                        "start_positions": 0, "end_positions": 0})

    def build_model(self, model_settings, *, seed: int = 42, tokenizer=None):
        from transformers import AutoModelForQuestionAnswering

        return build_auto_model(AutoModelForQuestionAnswering, model_settings, seed=seed, tokenizer=tokenizer)

    def load_trained(self, path: str, *, trust_remote_code: bool = False):
        from transformers import AutoModelForQuestionAnswering

        return load_auto_model(AutoModelForQuestionAnswering, path, trust_remote_code=trust_remote_code)

    def check_model(self, model, name: str) -> None:
        if not hasattr(model, "qa_outputs") and "QuestionAnswering" not in type(model).__name__:
            raise UserError(f"model {name!r} ({type(model).__name__}) has no span-prediction head",
                            hint=f"train it on {self.name} first")

    def compute_loss(self, model, batch):
        return model(**batch).loss

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64, description: str = "eval"):
        preds, answers = self.predict_answers(model, encoded, tokenizer, batch_size=batch_size, description=description)
        ids = list(preds)
        return squad_scores([preds[i] for i in ids], [answers[i] for i in ids])

    def predict_answers(self, model, encoded, tokenizer, *, batch_size: int = 64, description: str = "eval"):
        collate = self.collator(tokenizer)
        feats_all, starts, ends = [], [], []
        contexts: dict[str, str] = {}
        answers: dict[str, list[str]] = {}
        with eval_mode(model):
            for batch, feats in iter_batches(model, encoded, collate, batch_size, description):
                batch.pop("start_positions", None)
                batch.pop("end_positions", None)
                out = model(**batch)
                sl, el = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
                for k, f in enumerate(feats):
                    n = len(f["input_ids"])
                    feats_all.append(f)
                    starts.append(sl[k, :n])
                    ends.append(el[k, :n])
                    contexts[f["example_id"]] = f["context"]
                    answers[f["example_id"]] = f["answer_texts"]
        return postprocess(feats_all, starts, ends, contexts), answers


def make_qa_task(name: str) -> Task:
    key = name[len("qa/"):]
    if key == "squad":
        return QaTask(name, _squad_loader, "SQuAD v1.1 extractive QA")
    if key.startswith("mrqa-"):
        subset = key[len("mrqa-"):].lower().replace("_", "").replace("-", "")
        return QaTask(name, _mrqa_loader(subset), f"MRQA 2019 {key[5:]} (Hub)")
    if key.startswith("file:"):
        root = Path(key[len("file:"):]).expanduser()
        if not root.exists():
            raise UserError(f"QA data {str(root)!r} of task {name!r} does not exist", hint="check the path after qa/file:")
        return QaTask(name, _file_loader(root), f"SQuAD-format files {root}")
    raise UserError(f"unknown QA task {name!r}", hint="qa/squad, qa/mrqa-<subset> (Hub), qa/file:<SQuAD JSON>")


register_task(make_qa_task("qa/squad"))
register_task_prefix("qa/", make_qa_task, example="qa/<squad|mrqa-SUBSET|file:PATH>")
