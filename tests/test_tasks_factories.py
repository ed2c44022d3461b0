"""Offline builders for the task-family tests: tiny T5 / GPT-2 with a word-level tokenizer, and
small learnable data sets in the NER, SQuAD, SuperGLUE and raw-text formats (no tests here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.factories import WORDS, sentiment_sentence

PERSONS = ["john", "mary"]
PLACES = ["paris", "london"]
EXTRA = (PERSONS + PLACES + ["negative", "positive", "yes", "no", "does", "express", "sentence", "sst2", "joy",
                             "anger", "who", "where", "lives", "in", "what", "true", "false", "question",
                             "passage", "boolq", "sentence1", "sentence2", ":", "?", ".", ","])


def make_word_tokenizer(folder: Path, *, t5: bool = True):
    """A whitespace word-level fast tokenizer: <pad> </s> <unk> [<extra_id_0>] + the test words.

    T5 style (``t5=True``): ``</s>`` appended to every sequence, pad id 0, sentinel <extra_id_0>.
    GPT-2 style: no pad token (the loader must set one), ``</s>`` is the eos token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>"] + (["<extra_id_0>"] if t5 else [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(WORDS) + EXTRA))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    if t5:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>",
                                                           special_tokens=[("</s>", vocab["</s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       additional_special_tokens=["<extra_id_0>"])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_t5(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_word_tokenizer(folder, t5=True)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   relative_attention_num_buckets=8)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_word_tokenizer(folder, t5=False)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def ner_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """'john sat on the mat in paris' style: persons are PER, places LOC."""
    words, tags = [], []
    for _ in range(rng.randint(4, 7)):
        r = rng.random()
        if r < 0.2:
            words.append(rng.choice(PERSONS))
            tags.append("B-PER")
        elif r < 0.35:
            words += [rng.choice(PLACES)]
            tags += ["B-LOC"]
        else:
            words.append(rng.choice(["the", "cat", "sat", "on", "mat", "saw", "a", "dog", "with"]))
            tags.append("O")
    return words, tags


def make_ner_folder(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """``train.conll`` / ``dev.conll`` in the unified ``token<TAB>label<TAB>source`` format."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.conll", n_train), ("dev.conll", n_dev)):
        lines = []
        for _ in range(n):
            words, tags = ner_sentence(rng)
            lines += [f"{w}\t{t}\ttoy" for w, t in zip(words, tags)] + [""]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def make_squad_json(path: Path, n: int = 48, seed: int = 0) -> Path:
    """SQuAD v1.1 JSON: 'who lives in paris ?' over 'the cat sat . john lives in paris .'"""
    rng = random.Random(seed)
    paras = []
    for i in range(n):
        person, place = rng.choice(PERSONS), rng.choice(PLACES)
        filler = " ".join(rng.sample(["the", "cat", "sat", "on", "mat", "a", "dog", "saw"], 4))
        ctx = f"{filler} . {person} lives in {place} ."
        if i % 2:
            q, ans = f"who lives in {place} ?", person
        else:
            q, ans = f"where {person} lives ?", place
        start = ctx.index(f"{person} lives") if i % 2 else ctx.index(f"in {place}") + 3
        paras.append({"context": ctx, "qas": [{"id": f"q{i}", "question": q,
                                                "answers": [{"text": ans, "answer_start": start}]}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "toy", "paragraphs": paras}]}))
    return path


def make_boolq_folder(folder: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    """SuperGLUE layout BoolQ/{train,val}.jsonl: the answer is True iff the passage is positive."""
    rng = random.Random(seed)
    d = folder / "BoolQ"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("val.jsonl", n_dev)):
        rows = []
        for i in range(n):
            y = i % 2
            rows.append(json.dumps({"question": "is it good", "passage": sentiment_sentence(rng, y), "idx": i,
                                    "label": bool(y)}))
        (d / name).write_text("\n".join(rows) + "\n")
    return folder


def make_text_folder(folder: Path, n_lines: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.txt", "valid.txt"):
        lines = [" ".join(rng.choice(["the cat sat on the mat", "the dog ran", "john saw mary", "a good movie"])
                          for _ in range(3)) for _ in range(n_lines)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder

