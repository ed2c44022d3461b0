"""Named-entity recognition (token classification): ``ner/<source>[+plo]``.

Sources (local files under ``--data-dir``; ``ner/conll2003`` and ``ner/wnut17`` fall back to
the Hub when no folder is given):

- ``ner/conll2003``: the original 4-column IOB1 files ``eng.train`` / ``eng.testa`` (dev) /
  ``eng.testb`` (test) (``token POS chunk NER``, ``-DOCSTART-`` lines), converted to IOB2; or,
  when those are absent, the unified ``train.conll`` / ``dev.conll`` / ``test.conll``
  (``token<TAB>label<TAB>source``, IOB2) e.g. in ``conll2003/unified``.
- ``ner/wnut17``: ``wnut17train.conll`` / ``emerging.dev.conll`` / ``emerging.test.annotated``
  (``token<TAB>label``; sentence breaks are blank lines or lines holding only a TAB).
- ``ner/ontonotes-<domain>`` (bc, bn, mz, nw, tc, wb): the RegMean repo's
  ``onto.<train|development|test>.<domain>.ner`` (whitespace columns ``token label``).
- ``ner/twitter``: the RegMean repo's JSONL
  ``annotated.twitter-ner-20-21-tweet-<train|dev|test>-withcleaned.json`` with ``tokens`` and
  ``labels``.
- ``ner/file:<file or folder>``: one file for every split or a folder with ``train`` / ``dev`` /
  ``test`` files (``.conll``, ``.tsv``, ``.txt``, ``.jsonl``); token-per-line files take the
  token from the first column and the tag from the second (the unified
  ``token<TAB>label<TAB>source`` format) — or the last column for 4-column CoNLL files. The
  label space is read from the files.

``+plo`` selects the shared PER/LOC/ORG label space of the RegMean NER setting
(``O B-PER B-LOC B-ORG I-PER I-LOC I-ORG``): person/PERSON -> PER; location/LOC/GPE/FAC -> LOC;
ORG/ORGANIZATION/corporation -> ORG; every other type (MISC, ...) -> O. Tasks that share this
space can be merged head and all.

Encoding labels the first sub-token of every word and ignores the rest (-100); predictions are
read at first sub-tokens and mapped back to words (words cut off by ``--max-seq-length`` are
predicted ``O``), then scored with seqeval (entity-level P/R/F1, micro over types).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from mergekit_lab.errors import UserError
from mergekit_lab.evaluation.metrics_extra import entity_scores
from mergekit_lab.tasks._common import (
    build_auto_model,
    eval_mode,
    find_folder,
    hub_dataset,
    iter_batches,
    label_maps,
    load_auto_model,
    pad_collator,
    read_jsonl,
    split_path,
)
from mergekit_lab.tasks.base import Task, register_task, register_task_prefix

PLO_TYPES = ("PER", "LOC", "ORG")
PLO_LABELS = ["O"] + [f"B-{t}" for t in PLO_TYPES] + [f"I-{t}" for t in PLO_TYPES]
PLO_MAP = {"PER": "PER", "PERSON": "PER", "person": "PER",
           "LOC": "LOC", "GPE": "LOC", "FAC": "LOC", "location": "LOC",
           "ORG": "ORG", "ORGANIZATION": "ORG", "corporation": "ORG"}
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
WNUT_TYPES = ("corporation", "creative-work", "group", "location", "person", "product")
WNUT_LABELS = ["O"] + [f"{p}-{t}" for t in WNUT_TYPES for p in ("B", "I")]
ONTO_TYPES = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "DATE", "TIME", "PERCENT", "MONEY",
              "QUANTITY", "ORDINAL", "CARDINAL", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE")
ONTO_LABELS = ["O"] + [f"{p}-{t}" for t in ONTO_TYPES for p in ("B", "I")]
ONTO_DOMAINS = ("bc", "bn", "mz", "nw", "tc", "wb")
TOKEN_FILE_EXTS = (".conll", ".tsv", ".txt", ".ner", ".bio", "")
IGNORE = -100


# --------------------------------------------------------------------------------------------
# tag schemes and readers


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (I- starts an entity unless it continues one of the same type; B- only between two
    adjacent entities of one type) -> IOB2 (every entity starts with B-)."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-"):
            typ = tag[2:]
            if prev == "O" or prev[2:] != typ:
                tag = "B-" + typ
        out.append(tag)
        prev = tag
    return out


def to_plo(tags: list[str]) -> list[str]:
    """Map tags to the shared PER/LOC/ORG space; other types become O (an I- of a kept type after
    a dropped entity becomes B-, so the result stays valid IOB2)."""
    out = []
    prev = "O"
    for tag in tags:
        if tag == "O" or "-" not in tag:
            new = "O"
        else:
            prefix, typ = tag.split("-", 1)
            mapped = PLO_MAP.get(typ)
            if mapped is None:
                new = "O"
            elif prefix == "I" and (prev == "O" or prev[2:] != mapped):
                new = "B-" + mapped
            else:
                new = f"{prefix}-{mapped}"
        out.append(new)
        prev = new
    return out


def read_token_lines(path: Path, *, tag_column: int = 1, iob1: bool = False, sep: str | None = "\t"
                     ) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences of a one-token-a-line file. Blank lines, whitespace-only lines (WNUT-17's
    TAB-only lines) and ``-DOCSTART-`` lines end a sentence."""
    sents, tags = [], []
    words: list[str] = []
    labs: list[str] = []

    def flush() -> None:
        if words:
            sents.append(list(words))
            tags.append(iob1_to_iob2(labs) if iob1 else list(labs))
        words.clear()
        labs.clear()

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                flush()
                continue
            cols = line.split(sep) if sep and sep in line else line.split()
            if cols[0] == "-DOCSTART-":
                flush()
                continue
            if len(cols) < 2:
                raise UserError(f"line {lineno} of {path} has no tag column: {line!r}",
                                hint="expected token<TAB>label (one token a line, blank line between sentences)")
            words.append(cols[0])
            labs.append(cols[tag_column].strip())
    flush()
    return sents, tags


def _sniff_tag_column(path: Path) -> int:
    """4-column CoNLL files (token POS chunk NER) carry the tag last; other files in column 2."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.split()
            if len(cols) >= 2 and cols[0] != "-DOCSTART-":
                return -1 if len(cols) == 4 else 1
    return 1


# --------------------------------------------------------------------------------------------
# sources: (folder candidates, split -> file, reader)


def _conll_loader(task: NerTask, split: str, data_dir: Path | None):
    if data_dir is None:
        return _hub(task, split, "eriktks/conll2003", None, CONLL_LABELS)
    orig = {"train": "eng.train", "validation": "eng.testa", "test": "eng.testb"}
    unified = {"train": "train.conll", "validation": "dev.conll", "test": "test.conll"}
    try:
        folder = find_folder(data_dir, ["conll2003", "CoNLL-2003", "conll"], task.base_name, list(orig.values()))
    except UserError:
        folder = None
    if folder is not None:
        return read_token_lines(split_path(folder, split, orig, task.base_name), tag_column=-1, iob1=True, sep=None)
    folder = _find_either(data_dir, ["conll2003/unified", "conll2003", "unified"], task, orig, unified)
    return read_token_lines(split_path(folder, split, unified, task.base_name), tag_column=1)


def _find_either(data_dir: Path, cands: list[str], task: NerTask, *layouts: dict[str, str]) -> Path:
    names = [n for lay in layouts for n in lay.values()]
    return find_folder(data_dir, cands, task.base_name, names)


def _wnut_loader(task: NerTask, split: str, data_dir: Path | None):
    if data_dir is None:
        return _hub(task, split, "leondz/wnut_17", None, WNUT_LABELS)
    files = {"train": "wnut17train.conll", "validation": "emerging.dev.conll", "test": "emerging.test.annotated"}
    folder = find_folder(data_dir, ["wnut17", "wnut_17", "WNUT17"], task.base_name, list(files.values()))
    return read_token_lines(split_path(folder, split, files, task.base_name), tag_column=1)


def _onto_loader(domain: str):
    def load(task: NerTask, split: str, data_dir: Path | None):
        files = {s: f"onto.{f}.{domain}.ner" for s, f in
                 (("train", "train"), ("validation", "development"), ("test", "test"))}
        if data_dir is None:
            raise UserError(f"{task.base_name} needs local files", hint=f"pass --data-dir with {', '.join(files.values())}")
        folder = find_folder(data_dir, ["ontonotes", "ner/ontonotes"], task.base_name, list(files.values()))
        return read_token_lines(split_path(folder, split, files, task.base_name), tag_column=1, sep=None)

    return load


def _twitter_loader(task: NerTask, split: str, data_dir: Path | None):
    files = {s: f"annotated.twitter-ner-20-21-tweet-{f}-withcleaned.json" for s, f in
             (("train", "train"), ("validation", "dev"), ("test", "test"))}
    if data_dir is None:
        raise UserError(f"{task.base_name} needs local files", hint=f"pass --data-dir with {', '.join(files.values())}")
    folder = find_folder(data_dir, ["twitter", "ner/twitter"], task.base_name, list(files.values()))
    return read_jsonl_tokens(split_path(folder, split, files, task.base_name))


def read_jsonl_tokens(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    sents, tags = [], []
    for i, rec in enumerate(read_jsonl(path), 1):
        if "tokens" not in rec or "labels" not in rec or len(rec["tokens"]) != len(rec["labels"]):
            raise UserError(f"record {i} of {path} needs 'tokens' and 'labels' lists of one length")
        if rec["tokens"]:
            sents.append([str(t) for t in rec["tokens"]])
            tags.append([str(t) for t in rec["labels"]])
    return sents, tags


def _file_split(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    names = {"train": ["train"], "validation": ["dev", "validation", "valid"], "test": ["test"]}.get(split, [split])
    for n in names:
        for ext in (*TOKEN_FILE_EXTS, ".jsonl", ".json"):
            if (root / f"{n}{ext}").is_file():
                return root / f"{n}{ext}"
    raise UserError(f"no {split} file in {str(root)!r}",
                    hint=f"expected one of {', '.join(n + '.conll/.tsv/.txt/.jsonl' for n in names)}")


def _read_any(path: Path):
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl_tokens(path)
    # IOB1 -> IOB2 is the identity on IOB2 input, so user files may be in either scheme
    col = _sniff_tag_column(path)
    return read_token_lines(path, tag_column=col, iob1=True, sep=None if col == -1 else "\t")


def _file_loader(root: Path):
    def load(task: NerTask, split: str, data_dir: Path | None):
        return _read_any(_file_split(root, split))

    return load


def _hub(task: NerTask, split: str, path: str, config, names: list[str]):  # pragma: no cover - network
    ds = hub_dataset(path, config, split, task.base_name)
    feat = ds.features["ner_tags"].feature
    hub_names = list(feat.names) if hasattr(feat, "names") else names
    return [list(t) for t in ds["tokens"]], [[hub_names[i] for i in row] for row in ds["ner_tags"]]


# --------------------------------------------------------------------------------------------
# the task


class NerTask(Task):
    """Token classification over word sequences with IOB2 tags."""

    supports_k_shot = False  # one tag per word, no class per sentence

    def __init__(self, name: str, label_names: list[str], reader, *, plo: bool = False, description: str = ""):
        super().__init__(name=name, problem_type="single_label_classification",
                         label_names=list(PLO_LABELS if plo else label_names), text_fields=("tokens",),
                         metric_names=["f1", "precision", "recall", "accuracy"], loader=None,  # type: ignore[arg-type]
                         family="token_classification", description=description)
        self.reader = reader
        self.plo = plo
        self.base_name = name

    # -- data --
    def load(self, split, data_dir=None):
        from datasets import Dataset

        from mergekit_lab.tasks.base import canonical_split, resolve_data_dir

        split = canonical_split(split)
        sents, tags = self.reader(self, split, resolve_data_dir(data_dir))
        if self.plo:
            tags = [to_plo(t) for t in tags]
        index = {n: i for i, n in enumerate(self.label_names)}
        ids = []
        for k, row in enumerate(tags):
            try:
                ids.append([index[t] for t in row])
            except KeyError as e:
                raise UserError(f"tag {e.args[0]!r} in sentence {k + 1} of {self.name} ({split}) is not in the "
                                f"label space {' '.join(self.label_names)}",
                                hint="use the +plo suffix for the shared PER/LOC/ORG space, or ner/file:<path>") from None
        if not sents:
            raise UserError(f"split {split!r} of task {self.name!r} is empty", hint="check the data files")
        return Dataset.from_dict({"tokens": sents, "label": ids})

    def encode(self, ds, tokenizer, max_seq_length: int):
        def fn(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_seq_length)
            labels = []
            for i, tags in enumerate(batch["label"]):
                word_ids = enc.word_ids(i)
                row, prev = [], None
                for w in word_ids:
                    row.append(tags[w] if w is not None and w != prev else IGNORE)
                    if w is not None:
                        prev = w
                labels.append(row)
            out = dict(enc)
            out["labels"] = labels
            out["word_labels"] = batch["label"]
            return out

        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{self.name} needs a fast tokenizer (word ids for sub-token alignment)")
        return ds.map(fn, batched=True, remove_columns=ds.column_names)

    def collator(self, tokenizer):
        return pad_collator(tokenizer, {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE})

    # -- model --
    def build_model(self, model_settings, *, seed: int = 42, tokenizer=None):
        from transformers import AutoModelForTokenClassification

        return build_auto_model(AutoModelForTokenClassification, model_settings, seed=seed, tokenizer=tokenizer,
                                configure=partial(label_maps, label_names=self.label_names))

    def load_trained(self, path: str, *, trust_remote_code: bool = False):
        from transformers import AutoModelForTokenClassification

        return load_auto_model(AutoModelForTokenClassification, path, trust_remote_code=trust_remote_code)

    def check_model(self, model, name: str) -> None:
        id2label = getattr(model.config, "id2label", None) or {}
        names = [id2label[i] for i in sorted(id2label)]
        if names != self.label_names:
            raise UserError(f"model {name!r} predicts tags {' '.join(map(str, names))}, not the {self.name} tags "
                            f"{' '.join(self.label_names)}", hint="evaluate each model on its label space (+plo for the shared one)")

    def compute_loss(self, model, batch):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return self.loss(out.logits, batch["labels"])

    def loss(self, logits, labels, label_mask=None):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64, description: str = "eval"):
        gold, pred = self.predict_words(model, encoded, tokenizer, batch_size=batch_size, description=description)
        return entity_scores(gold, pred)

    def predict_words(self, model, encoded, tokenizer, *, batch_size: int = 64, description: str = "eval"):
        """Gold and predicted tag sequences per sentence (word level)."""
        collate = self.collator(tokenizer)
        gold, pred = [], []
        with eval_mode(model):
            for batch, feats in iter_batches(model, encoded, collate, batch_size, description):
                labels = batch.pop("labels")
                logits = model(**batch).logits
                ids = logits.argmax(-1).cpu().numpy()
                first = (labels != IGNORE).cpu().numpy()
                for row_ids, row_first, f in zip(ids, first, feats):
                    words = [self.label_names[i] for i in row_ids[row_first]]
                    n = len(f["word_labels"])
                    words = words[:n] + ["O"] * (n - len(words))
                    pred.append(words)
                    gold.append([self.label_names[i] for i in f["word_labels"]])
        return gold, pred

    def compute_metrics(self, logits, labels, label_mask=None):
        """Token-level logits (n, seq, labels) and labels with -100 at ignored positions."""
        logits, labels = np.asarray(logits), np.asarray(labels)
        ids = logits.argmax(-1)
        gold, pred = [], []
        for r_ids, r_lab in zip(ids, labels):
            keep = r_lab != IGNORE
            gold.append([self.label_names[i] for i in r_lab[keep]])
            pred.append([self.label_names[i] for i in r_ids[keep]])
        return entity_scores(gold, pred)


# --------------------------------------------------------------------------------------------
# registration


def _split_plo(name: str) -> tuple[str, bool]:
    return (name[: -len("+plo")], True) if name.endswith("+plo") else (name, False)


def _labels_from_files(root: Path) -> list[str]:
    files = [root] if root.is_file() else []
    if root.is_dir():
        for split in ("train", "validation", "test"):
            try:
                files.append(_file_split(root, split))
            except UserError:
                pass
    if not files:
        raise UserError(f"no NER files in {str(root)!r}", hint="expected train/dev/test .conll/.tsv/.txt/.jsonl files")
    seen: set[str] = set()
    for p in files:
        for row in _read_any(p)[1]:
            seen.update(row)
    types = sorted({t.split("-", 1)[1] for t in seen if "-" in t})
    bad = sorted(t for t in seen if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2))
    if bad:
        raise UserError(f"tags {bad[:5]} in {str(root)!r} are not IOB2 (O, B-TYPE, I-TYPE)")
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def make_ner_task(name: str) -> Task:
    base, plo = _split_plo(name)
    key = base[len("ner/"):]
    if key == "conll2003":
        labels, reader, desc = CONLL_LABELS, _conll_loader, "CoNLL-2003 English NER (IOB1 -> IOB2)"
    elif key == "wnut17":
        labels, reader, desc = WNUT_LABELS, _wnut_loader, "WNUT-17 emerging entities"
    elif key == "twitter":
        labels, reader, desc = PLO_LABELS, _twitter_loader, "Twitter NER 2020-21 (RegMean JSONL)"
    elif key.startswith("ontonotes-"):
        domain = key[len("ontonotes-"):]
        if domain not in ONTO_DOMAINS:
            raise UserError(f"unknown OntoNotes domain {domain!r} in {name!r}", hint=f"domains: {', '.join(ONTO_DOMAINS)}")
        labels, reader, desc = ONTO_LABELS, _onto_loader(domain), f"OntoNotes 5.0 NER, domain {domain}"
    elif key.startswith("file:"):
        root = Path(key[len("file:"):]).expanduser()
        if not root.exists():
            raise UserError(f"NER data {str(root)!r} of task {name!r} does not exist", hint="check the path after ner/file:")
        labels = PLO_LABELS if plo else _labels_from_files(root)
        reader, desc = _file_loader(root), f"NER files {root}"
    else:
        raise UserError(f"unknown NER task {name!r}",
                        hint="ner/conll2003, ner/wnut17, ner/twitter, ner/ontonotes-<bc|bn|mz|nw|tc|wb>, "
                             "ner/file:<path>; append +plo for the shared PER/LOC/ORG labels")
    task = NerTask(name, labels, reader, plo=plo, description=desc)
    task.base_name = base
    return task


for _n in ("ner/conll2003", "ner/wnut17", "ner/twitter", "ner/conll2003+plo", "ner/wnut17+plo"):
    register_task(make_ner_task(_n))
register_task_prefix("ner/", make_ner_task, example="ner/<conll2003|wnut17|twitter|ontonotes-DOMAIN|file:PATH>[+plo]")

__all__ = ["NerTask", "iob1_to_iob2", "to_plo", "read_token_lines", "PLO_LABELS", "CONLL_LABELS"]
