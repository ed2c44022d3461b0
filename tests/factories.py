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


def make_noised_lora_pool(root: Path, backbone: Path, model_cls, settings_for, target: str, task_prefix: str,
                          noises: dict[str, float]):
    """A LoRA pool around the reference module the similarity scorer tunes on ``target``: every
    module starts as the same seeded LoRA; then each is overwritten with the tuned reference plus
    Gaussian noise of its scale on the delta tensors (scale 0: exactly the reference). Returns
    (``root / "pool"``, the reference); ``settings_for(pool)`` gives the scorer's SimilaritySettings."""
    import torch
    from safetensors.torch import save_file

    from mergekit_lab.delta import DeltaSettings, save_module, wrap_model, write_meta
    from mergekit_lab.delta.modules import WEIGHTS_NAME
    from mergekit_lab.similarity.run import build_context, collect_pool

    pool = root / "pool"
    seedling = wrap_model(model_cls.from_pretrained(backbone), DeltaSettings(peft="lora", lora_r=4, lora_alpha=8), seed=0)
    for name in noises:
        save_module(seedling, pool / name, base_model=str(backbone), task=f"{task_prefix}src-{name}")
    ref = build_context(settings_for(pool), target, collect_pool([pool]), True).ensure_reference()
    g = torch.Generator().manual_seed(0)
    for name, noise in noises.items():
        t = {k: (v + noise * torch.randn(v.shape, generator=g) if k in ref.delta else v).contiguous()
             for k, v in ref.state.items()}
        save_file(t, str(pool / name / WEIGHTS_NAME))
        write_meta(pool / name, kind="lora", base_model=str(backbone), task=f"{task_prefix}src-{name}")
    return pool, ref
