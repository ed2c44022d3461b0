"""Tiny models, tokenizers and data built offline for the tests (one place for all of them)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a movie film plot actor good great fine wonderful lovely excellent bad awful terrible boring dull "
    "poor is was very not really quite story scene funny sad it this that and but of to with i you he she "
    "they we cat dog runs ran sat on mat happy angry fear joy love hate book read wrote john mary saw".split()
)
POS = ["good", "great", "fine", "wonderful", "lovely", "excellent"]
NEG = ["bad", "awful", "terrible", "boring", "dull", "poor"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_tokenizer(folder: Path):
    """An uncased WordPiece tokenizer over a small fixed vocabulary, saved in ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,!?'"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    # transformers 5: the tokenizer takes the vocabulary itself (a vocab_file argument is ignored)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def make_tiny_bert(folder: Path, *, num_labels: int = 2, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A 2-layer BERT (hidden 32) with a sequence-classification head and a tokenizer, in ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(folder)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(folder)
    return folder


def sentiment_sentence(rng: random.Random, label: int) -> str:
    word = rng.choice(POS if label else NEG)
    filler = rng.sample(["the", "movie", "film", "plot", "story", "was", "very", "really", "quite", "this"], 4)
    words = filler[:2] + [word] + filler[2:]
    return " ".join(words)


def make_glue_sst2(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """A learnable SST-2-format folder (``folder/SST-2/train.tsv``, ``dev.tsv``)."""
    rng = random.Random(seed)
    d = folder / "SST-2"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            lines.append(f"{sentiment_sentence(rng, y)}\t{y}")
        (d / name).write_text("\n".join(lines) + "\n")
    return folder


def make_glue_cola(folder: Path, n_train: int = 64, n_dev: int = 32, seed: int = 1) -> Path:
    """A CoLA-format folder (no header): acceptable = sentences ending with a period."""
    rng = random.Random(seed)
    d = folder / "CoLA"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = []
        for i in range(n):
            y = i % 2
            s = " ".join(rng.sample(["john", "mary", "saw", "the", "cat", "dog", "sat", "on", "mat"], 4))
            lines.append(f"gj04\t{y}\t{'' if y else '*'}\t{s}{' .' if y else ''}")
        (d / name).write_text("\n".join(lines) + "\n")
    return folder
