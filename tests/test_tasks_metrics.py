"""Metrics and data handling of the task families, on hand-computed cases (no models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mergekit_lab.errors import UserError
from mergekit_lab.evaluation.metrics_extra import (
    entity_scores,
    multirc_scores,
    normalize_answer,
    squad_exact,
    squad_f1,
    squad_scores,
)
from mergekit_lab.tasks import get_task
from mergekit_lab.tasks.ner import iob1_to_iob2, read_token_lines, to_plo
from mergekit_lab.tasks.qa import best_span, postprocess


def test_seqeval_entity_f1_crafted_pair():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold entities: PER(0-1), LOC(3), ORG(s2); predicted: PER(0-1) ok, ORG(3) wrong, ORG(s2) ok
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(5 / 6)
    # a boundary error is a miss and a false alarm: PER(0-1) predicted as PER(0) only
    s = entity_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
    assert s["f1"] == 0.0


def test_squad_em_f1_official_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a day") == "apple day"
    assert squad_exact("the Eiffel Tower.", "Eiffel Tower") == 1.0
    # pred tokens {eiffel, tower, in, paris}, gold {eiffel, tower}: P 1/2, R 1, F1 2/3
    assert squad_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert squad_f1("", "x") == 0.0
    # multiset overlap: "a a b" vs "a b b" -> articles removed? no: 'a' is an article -> "b" vs "b b"
    assert squad_f1("a a b", "a b b") == pytest.approx(2 * (1 * 0.5) / 1.5)
    # max over gold answers, mean over questions
    s = squad_scores(["Denver Broncos", "1990"], [["Broncos", "Denver Broncos"], ["in 1991"]])
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx((1.0 + 0.0) / 2)


def test_multirc_f1a_and_em():
    preds = [1, 0, 1, 1, 0]
    labels = [1, 0, 0, 1, 1]
    questions = ["q1", "q1", "q1", "q2", "q2"]
    s = multirc_scores(preds, labels, questions)
    # tp = 2 (idx 0, 3), fp = 1 (idx 2), fn = 1 (idx 4): F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    assert s["f1a"] == pytest.approx(2 / 3)
    assert s["em"] == 0.0  # q1 has a wrong option, q2 too
    s = multirc_scores([1, 0, 1], [1, 0, 0], ["a", "a", "b"])
    assert s["em"] == pytest.approx(0.5)


def test_iob1_to_iob2_and_plo_mapping():
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-MISC"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1_to_iob2(iob2) == iob2  # identity on IOB2
    assert to_plo(["B-MISC", "I-MISC", "B-GPE", "I-GPE", "B-person", "B-corporation", "B-product"]) == [
        "O", "O", "B-LOC", "I-LOC", "B-PER", "B-ORG", "O"]


def test_conll_original_files_are_converted(tmp_path: Path):
    d = tmp_path / "conll2003"
    d.mkdir()
    text = ("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\n\n"
            "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\nSmith NNP I-NP B-PER\n")
    for name in ("eng.train", "eng.testa"):
        (d / name).write_text(text)
    task = get_task("ner/conll2003")
    ds = task.load("validation", tmp_path)
    names = task.label_names
    assert ds["tokens"] == [["EU", "rejects", "German"], ["Peter", "Blackburn", "Smith"]]
    assert [[names[i] for i in row] for row in ds["label"]] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER", "B-PER"]]
    plo = get_task("ner/conll2003+plo").load("train", tmp_path)
    plo_names = get_task("ner/conll2003+plo").label_names
    assert [plo_names[i] for i in plo["label"][0]] == ["B-ORG", "O", "O"]
    with pytest.raises(UserError, match="eng.testb"):
        task.load("test", tmp_path)


def test_wnut_tab_only_separator_lines(tmp_path: Path):
    p = tmp_path / "wnut17train.conll"
    p.write_text("@paul\tO\nEmpire\tB-location\nState\tI-location\n\t\nFrom\tO\nGreen\tB-person\n\t\n")
    sents, tags = read_token_lines(p)
    assert sents == [["@paul", "Empire", "State"], ["From", "Green"]]
    assert tags == [["O", "B-location", "I-location"], ["O", "B-person"]]
    (tmp_path / "emerging.dev.conll").write_text("a\tO\n\nb\tB-group\n")
    ds = get_task("ner/wnut17").load("validation", tmp_path)
    assert len(ds) == 2


def test_ner_missing_file_lists_expected_names(tmp_path: Path):
    with pytest.raises(UserError) as e:
        get_task("ner/ontonotes-bc").load("train", tmp_path)
    assert "onto.train.bc.ner" in str(e.value) + str(e.value.hint or "")
    with pytest.raises(UserError, match="domain"):
        get_task("ner/ontonotes-xx")


def test_twitter_and_ontonotes_readers(tmp_path: Path):
    d = tmp_path / "twitter"
    d.mkdir()
    rec = {"tokens": ["mary", "in", "paris"], "labels": ["B-PER", "O", "B-LOC"]}
    (d / "annotated.twitter-ner-20-21-tweet-dev-withcleaned.json").write_text(json.dumps(rec) + "\n")
    t = get_task("ner/twitter")
    ds = t.load("validation", tmp_path)
    assert [t.label_names[i] for i in ds["label"][0]] == ["B-PER", "O", "B-LOC"]
    o = tmp_path / "ontonotes"
    o.mkdir()
    (o / "onto.development.nw.ner").write_text("Obama B-PERSON\nvisited O\nNew B-GPE\nYork I-GPE\n\n")
    t = get_task("ner/ontonotes-nw+plo")
    ds = t.load("validation", tmp_path)
    assert [t.label_names[i] for i in ds["label"][0]] == ["B-PER", "O", "B-LOC", "I-LOC"]


def test_sliding_window_recovers_answer_across_boundary(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["the", "cat", "sat", "on", "mat"] * 8  # 40 one-token context words
    task = get_task("qa/squad")
    from datasets import Dataset

    def data(context, answer, start):
        return Dataset.from_dict({"id": ["x"], "question": ["who saw"], "context": [context],
                                  "answer_texts": [[answer]], "answer_starts": [[start]]})

    probe = task.encode(data(" ".join(words), "the", 0), tok, 24)
    cap = sum(1 for o in probe[0]["offset_mapping"] if o[0] >= 0)  # context tokens in a window
    # "john saw mary" (3 tokens) starts on the last context token of the first window
    ctx_words = words[: cap - 1] + ["john", "saw", "mary"] + words[cap - 1:]
    context = " ".join(ctx_words)
    start = context.index("john saw mary")
    ds = data(context, "john saw mary", start)
    enc = task.encode(ds, tok, 24)  # windows of 24 tokens, overlap 8
    assert len(enc) >= 2
    first = enc[0]
    ctx_offsets = [o for o in first["offset_mapping"] if o[0] >= 0]
    assert start < ctx_offsets[-1][1] < start + len("john saw mary")  # the first window cuts the answer
    assert first["start_positions"] == 0 and first["end_positions"] == 0
    holding = [f for f in enc if f["start_positions"] > 0]
    assert holding, "some window must contain the whole answer"
    f = holding[0]
    o = f["offset_mapping"]
    assert context[o[f["start_positions"]][0]:o[f["end_positions"]][1]] == "john saw mary"
    # crafted logits: peak at the true span in that window, noise elsewhere
    starts, ends = [], []
    for feat in enc:
        n = len(feat["input_ids"])
        s, e = np.zeros(n), np.zeros(n)
        if feat["start_positions"] > 0:
            s[feat["start_positions"]], e[feat["end_positions"]] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    feats = [enc[i] for i in range(len(enc))]
    preds = postprocess(feats, starts, ends, {"x": context})
    assert preds == {"x": "john saw mary"}


def test_best_span_rules():
    offsets = [[-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]]
    # the best raw pair (start 2, end 1) is invalid (end < start), so (2, 2) wins
    s = np.array([0, 1, 9, 0, 10.0])
    e = np.array([0, 8, 2, 1, 10.0])
    score, a, b = best_span(s, e, offsets)
    assert (a, b) == (4, 7) and score == pytest.approx(11)
    assert best_span(np.zeros(2), np.zeros(2), [[-1, -1], [-1, -1]]) is None


def test_text2text_invalid_generations_count_as_wrong(glue_dir):
    task = get_task("t2t/glue/sst2")
    assert task.parse("positive", 1) == (1.0, True)
    assert task.parse(" Negative ", 1) == (0.0, True)
    assert task.parse("banana", 1) == (0.0, False)  # invalid -> the wrong class
    assert task.parse("", 0) == (1.0, False)
    from datasets import Dataset

    enc = Dataset.from_dict({"gold": [1.0, 0.0, 1.0, 0.0]})
    m = task.score(["positive", "negative", "maybe", "positive"], enc)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["invalid_rate"] == pytest.approx(0.25)
    emo = get_task("t2t/emotion/isear")
    assert emo.parse("<extra_id_0> yes", 0.0) == (1.0, True)
    assert emo.parse("perhaps", 1.0) == (0.0, False)
    stsb = get_task("t2t/glue/stsb")
    assert stsb.parse("3.8", 1.0) == (3.8, True)
    assert stsb.parse("high", 1.0) == (5.0, False)


def test_text2text_formats(glue_dir):
    from datasets import Dataset

    task = get_task("t2t/glue/sst2")
    pairs = task.to_pairs(Dataset.from_dict({"sentence": ["a good film"], "label": [1]}))
    assert pairs["source"] == ["sst2 sentence: a good film"] and pairs["target"] == ["positive"]
    emo = get_task("t2t/emotion/isear")
    n = len(emo.label_names)
    label, mask = [0.0] * n, [0.0] * n
    label[0], mask[0], mask[1] = 1.0, 1.0, 1.0
    pairs = emo.to_pairs(Dataset.from_dict({"text": ["so happy"], "label": [label], "label_mask": [mask]}))
    assert pairs["source"] == ["does the sentence express joy? <extra_id_0> so happy",
                               "does the sentence express anger? <extra_id_0> so happy"]
    assert pairs["target"] == ["<extra_id_0> yes", "<extra_id_0> no"]


def test_mlm_fixed_masks_are_reproducible(tiny_bert):
    from transformers import AutoTokenizer

    from mergekit_lab.tasks.mlm import fixed_masks

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids = list(range(10, 50))
    special = [1] + [0] * 38 + [1]
    a = fixed_masks(ids, special, 3, tok)
    b = fixed_masks(ids, special, 3, tok)
    c = fixed_masks(ids, special, 4, tok)
    assert a == b and a != c
    n_masked = sum(1 for y in a[1] if y != -100)
    assert n_masked == round(0.15 * 38)
    assert a[1][0] == -100 and a[1][-1] == -100


def test_superglue_and_hub_local_loaders(tmp_path: Path):
    d = tmp_path / "MultiRC"
    d.mkdir()
    rec = {"idx": 0, "passage": {"text": "john saw mary", "questions": [
        {"idx": 0, "question": "who saw", "answers": [{"text": "john", "label": 1, "idx": 0},
                                                     {"text": "mary", "label": 0, "idx": 1}]}]}}
    (d / "val.jsonl").write_text(json.dumps(rec) + "\n")
    ds = get_task("superglue/multirc").load("validation", tmp_path)
    assert ds["label"] == [1, 0] and ds["group"] == ["0-0", "0-0"]
    r = tmp_path / "ReCoRD"
    r.mkdir()
    rec = {"idx": 0, "passage": {"text": "john met mary in paris", "entities": [{"start": 0, "end": 3},
                                                                             {"start": 9, "end": 12}]},
           "qas": [{"idx": "q", "query": "@placeholder met someone", "answers": [{"start": 0, "end": 3, "text": "john"}]}]}
    (r / "val.jsonl").write_text(json.dumps(rec) + "\n")
    ds = get_task("superglue/record").load("validation", tmp_path)
    assert ds["sentence2"] == ["john met someone", "mary met someone"] and ds["label"] == [1, 0]
    t = get_task("superglue/record")
    m = t.compute_grouped(np.array([[0.0, 1.0], [0.0, 3.0]]), np.array([1, 0]), ds)
    assert m == {"f1": 0.0, "exact_match": 0.0}  # 'mary' wins but the answer is 'john'
    with pytest.raises(UserError, match="train.jsonl"):
        get_task("superglue/multirc").load("train", tmp_path)
    p = tmp_path / "paws"
    p.mkdir()
    (p / "dev.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n")
    assert get_task("hub/paws").load("validation", tmp_path)["label"] == [1]
