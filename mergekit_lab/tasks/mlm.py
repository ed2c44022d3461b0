"""Masked language modelling on raw text: ``text:<file or folder>``.

``<folder>`` holds ``train.txt`` and ``valid.txt`` (or ``dev.txt`` / ``validation.txt``) and
optionally ``test.txt``; a single file serves every split. Every non-empty line is a document;
documents are tokenised without special tokens, concatenated and cut into blocks of
``--max-seq-length`` tokens (including [CLS] and [SEP]) — the usual ``run_mlm`` grouping.

Training masks dynamically (BERT recipe: 15% of the non-special tokens are chosen; 80% become
[MASK], 10% a random token, 10% stay). Evaluation uses a FIXED masking: the chosen positions
and replacements of block ``i`` come from ``numpy.random.default_rng([MASK_SEED, i])`` and
exactly ``round(0.15 * n)`` (at least one) of its ``n`` maskable tokens are chosen, so two
models (or two runs) evaluated on the same text, tokenizer and ``--max-seq-length`` see the same
masks. Metrics: ``perplexity = exp(loss)``, where ``loss`` is the mean cross-entropy over the
masked tokens, and ``masked_tokens`` (the count). Lower is better.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mergekit_lab.errors import UserError
from mergekit_lab.tasks._common import (
    build_auto_model,
    eval_mode,
    iter_batches,
    pad_collator,
)
from mergekit_lab.tasks.base import Task, canonical_split, register_task_prefix, resolve_data_dir

MLM_PROBABILITY = 0.15
MASK_SEED = 1234
HEAD_SEED = 0  # initialises a missing masked-LM head (reproducible perplexity)
IGNORE = -100
SPLIT_FILES = {"train": ["train.txt", "train.raw"],
               "validation": ["valid.txt", "validation.txt", "dev.txt", "valid.raw"],
               "test": ["test.txt", "test.raw"]}


def _text_file(root: Path, split: str, name: str) -> Path:
    if root.is_file():
        return root
    if split not in SPLIT_FILES:
        raise UserError(f"task {name} has no split {split!r}", hint="splits: train, validation, test")
    for n in SPLIT_FILES[split]:
        if (root / n).is_file():
            return root / n
    raise UserError(f"no {split} text file in {str(root)!r} for {name}",
                    hint=f"expected one of {', '.join(SPLIT_FILES[split])} (or give one file: text:<file>)")


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (e.g. [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


def fixed_masks(ids: list[int], special: list[int], block_index: int, tokenizer, *, seed: int = MASK_SEED,
                probability: float = MLM_PROBABILITY) -> tuple[list[int], list[int]]:
    """(masked input ids, labels with -100 where not masked) for one block, reproducibly."""
    rng = np.random.default_rng([seed, block_index])
    cand = [k for k, s in enumerate(special) if not s]
    labels = [IGNORE] * len(ids)
    masked = list(ids)
    if not cand:
        return masked, labels
    n = max(1, int(round(probability * len(cand))))
    chosen = rng.choice(np.asarray(cand), size=min(n, len(cand)), replace=False)
    for k in sorted(int(c) for c in chosen):
        labels[k] = ids[k]
        r = rng.random()
        if r < 0.8:
            masked[k] = tokenizer.mask_token_id
        elif r < 0.9:
            masked[k] = int(rng.integers(len(tokenizer)))
    return masked, labels


def dynamic_masks(input_ids: torch.Tensor, special: torch.Tensor, tokenizer,
                  probability: float = MLM_PROBABILITY) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking drawn from torch's global RNG (training)."""
    labels = input_ids.clone()
    prob = torch.full(labels.shape, probability)
    prob.masked_fill_(special.bool(), 0.0)
    chosen = torch.bernoulli(prob).bool()
    labels[~chosen] = IGNORE
    inputs = input_ids.clone()
    replace = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & chosen
    inputs[replace] = tokenizer.mask_token_id
    rand = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & chosen & ~replace
    inputs[rand] = torch.randint(len(tokenizer), labels.shape, dtype=torch.long)[rand]
    return inputs, labels


class MlmTask(Task):
    """Masked-LM training and perplexity evaluation on raw text."""

    supports_k_shot = False  # raw text has no classes

    def __init__(self, name: str, root: Path):
        super().__init__(name=name, problem_type="single_label_classification", label_names=["token"],
                         text_fields=("text",), metric_names=["perplexity", "loss", "masked_tokens"],
                         loader=None, family="masked_lm", greater_is_better=False,  # type: ignore[arg-type]
                         description=f"masked LM on {root}")
        self.root = root

    def load(self, split, data_dir=None):
        from datasets import Dataset

        split = canonical_split(split)
        root = self.root
        if not root.is_absolute() and not root.exists() and data_dir is not None:
            root = resolve_data_dir(data_dir) / root
        path = _text_file(root, split, self.name)
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if not lines:
            raise UserError(f"{path} has no text", hint="give a UTF-8 file with one document a line")
        return Dataset.from_dict({"text": lines})

    def encode(self, ds, tokenizer, max_seq_length: int):
        from datasets import Dataset

        if tokenizer.mask_token_id is None:
            raise UserError(f"the tokenizer has no mask token, so {self.name} (masked LM) cannot use it",
                            hint="use a masked-LM model (BERT, RoBERTa, ...)")
        prefix, suffix = special_affixes(tokenizer)
        block = max_seq_length - len(prefix) - len(suffix)
        if block < 8:
            raise UserError(f"--max-seq-length {max_seq_length} is too short for masked-LM blocks")
        ids: list[int] = []
        for start in range(0, len(ds), 1000):
            enc = tokenizer(ds[start:start + 1000]["text"], add_special_tokens=False)
            for row in enc["input_ids"]:
                ids.extend(row)
        cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "special_tokens_mask": [],
                                 "masked_input_ids": [], "mlm_labels": []}
        for i, s in enumerate(range(0, len(ids), block)):
            chunk = ids[s:s + block]
            if len(chunk) < max(8, block // 8) and i > 0:
                break  # drop a short tail, as run_mlm does
            full = prefix + chunk + suffix
            special = [1] * len(prefix) + [0] * len(chunk) + [1] * len(suffix)
            masked, labels = fixed_masks(full, special, i, tokenizer)
            cols["input_ids"].append(full)
            cols["attention_mask"].append([1] * len(full))
            cols["special_tokens_mask"].append(special)
            cols["masked_input_ids"].append(masked)
            cols["mlm_labels"].append(labels)
        if not cols["input_ids"]:
            raise UserError(f"no text to encode for {self.name}")
        return Dataset.from_dict(cols)

    def collator(self, tokenizer):
        base = pad_collator(tokenizer, {"input_ids": None, "attention_mask": 0, "special_tokens_mask": 1})

        def collate(features):
            batch = base(features)
            inputs, labels = dynamic_masks(batch["input_ids"], batch.pop("special_tokens_mask"), tokenizer)
            batch["input_ids"], batch["labels"] = inputs, labels
            return batch

        return collate

    def eval_collator(self, tokenizer):
        base = pad_collator(tokenizer, {"masked_input_ids": None, "attention_mask": 0, "mlm_labels": IGNORE})

        def collate(features):
            b = base(features)
            return {"input_ids": b["masked_input_ids"], "attention_mask": b["attention_mask"], "labels": b["mlm_labels"]}

        return collate

    def build_model(self, model_settings, *, seed: int = 42, tokenizer=None):
        from transformers import AutoModelForMaskedLM

        return build_auto_model(AutoModelForMaskedLM, model_settings, seed=seed, tokenizer=tokenizer)

    def load_trained(self, path: str, *, trust_remote_code: bool = False):
        """The model with its masked-LM head. An encoder saved without one (builtin:minilm, a
        sentence-embedding model) gets BERT's head with the decoder tied to the input embeddings
        and the rest (transform dense + LayerNorm, bias) freshly initialised under a fixed seed,
        so its perplexity is reproducible; a warning says so."""
        from transformers import AutoModelForMaskedLM

        from mergekit_lab.models.loading import _load_error, resolve_model_ref
        from mergekit_lab.runtime import warn

        ref = resolve_model_ref(str(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            try:
                model, info = AutoModelForMaskedLM.from_pretrained(ref, trust_remote_code=trust_remote_code,
                                                                   output_loading_info=True)
            except (OSError, ValueError) as e:
                raise _load_error(ref, e) from None
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("decoder.weight"))
        if missing:
            warn(f"{path} has no trained masked-LM head: {len(missing)} head tensors are newly initialised "
                 f"(seed {HEAD_SEED}), so its perplexity is that of an untrained head; train one with "
                 f"`mklab train --task text:...` or `mklab fit-mlm-head`")
        return model

    def check_model(self, model, name: str) -> None:
        if model.get_output_embeddings() is None:
            raise UserError(f"model {name!r} has no language-model head", hint="load it as a masked LM")

    def compute_loss(self, model, batch):
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    def evaluate(self, model, encoded, tokenizer, *, accelerator=None, batch_size: int = 64, description: str = "eval"):
        total, count = 0.0, 0
        with eval_mode(model):
            for batch, _ in iter_batches(model, encoded, self.eval_collator(tokenizer), batch_size, description):
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum"))
                count += int((labels != IGNORE).sum())
        loss = total / max(count, 1)
        return {"perplexity": float(math.exp(min(loss, 700.0))), "loss": loss, "masked_tokens": float(count)}


def make_text_task(name: str) -> Task:
    root = Path(name[len("text:"):]).expanduser()
    if not str(root) or str(root) == ".":
        raise UserError(f"task {name!r} names no text file", hint="text:<file or folder with train.txt/valid.txt>")
    if not root.exists() and root.is_absolute():
        raise UserError(f"text data {str(root)!r} of task {name!r} does not exist", hint="check the path after text:")
    return MlmTask(name, root)


register_task_prefix("text:", make_text_task, example="text:<file or folder>")
