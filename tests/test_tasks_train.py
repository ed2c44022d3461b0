"""Each task family trains through `mklab train`'s code path (a few steps, the loss falls) and
evaluates through `mklab eval`'s (the metric keys come back), on tiny models built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_tasks_factories import (
    make_boolq_folder,
    make_ner_folder,
    make_squad_json,
    make_text_folder,
    make_tiny_gpt2,
    make_tiny_t5,
)


def _train(tmp: Path, model: Path, task: str, data_dir, *, steps: int = 40, lr: float = 3e-3, max_len: int = 64,
           batch: int = 16) -> dict:
    from mergekit_lab.cli.train import TrainSettings, train_model

    s = TrainSettings(
        run={"output_dir": str(tmp / "out"), "seed": 0, "quiet": True},
        model={"name_or_path": str(model)},
        data={"task": task, "data_dir": str(data_dir) if data_dir else None, "max_seq_length": max_len},
        training={"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": batch,
                  "logging_steps": 5, "per_device_eval_batch_size": 32},
    )
    return train_model(s)


def _losses(res: dict) -> list[float]:
    return [h["loss"] for h in res["training"]["history"] if "loss" in h]


def _assert_falls(res: dict) -> None:
    losses = _losses(res)
    assert len(losses) >= 4, losses
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses


def _eval(model_dir: Path, task: str, data_dir) -> dict:
    from mergekit_lab.cli.eval import EvalSettings, run_eval

    s = EvalSettings(run={"quiet": True}, model={"name_or_path": [str(model_dir)]},
                     data={"task": [task], "data_dir": str(data_dir) if data_dir else None, "max_seq_length": 64},
                     eval={"per_device_eval_batch_size": 16})
    return run_eval(s)["rows"][0]["metrics"]


def test_ner_trains_and_evaluates(tmp_path, tiny_bert):
    data = make_ner_folder(tmp_path / "ner")
    task = f"ner/file:{data}"
    res = _train(tmp_path, tiny_bert, task, None, steps=40)
    _assert_falls(res)
    m = _eval(tmp_path / "out", task, None)
    assert set(m) == {"f1", "precision", "recall", "accuracy"}
    assert m["f1"] > 0.5  # two entity types, one word each: learnable in 40 steps
    assert res["metrics"]["validation"]["f1"] == pytest.approx(m["f1"])


def test_qa_trains_and_evaluates(tmp_path, tiny_bert):
    d = tmp_path / "squad"
    make_squad_json(d / "train-v1.1.json", n=64, seed=0)
    make_squad_json(d / "dev-v1.1.json", n=24, seed=1)
    res = _train(tmp_path, tiny_bert, "qa/squad", tmp_path, steps=40)
    _assert_falls(res)
    m = _eval(tmp_path / "out", "qa/squad", tmp_path)
    assert set(m) == {"exact_match", "f1"}
    assert 0.0 <= m["exact_match"] <= m["f1"] <= 1.0


def test_superglue_boolq_trains_and_evaluates(tmp_path, tiny_bert):
    data = make_boolq_folder(tmp_path / "sg")
    res = _train(tmp_path, tiny_bert, "superglue/boolq", data, steps=40)
    _assert_falls(res)
    m = _eval(tmp_path / "out", "superglue/boolq", data)
    assert set(m) == {"accuracy"}


def test_t5_text_to_text_trains_and_generates(tmp_path, glue_dir):
    t5 = make_tiny_t5(tmp_path / "t5")
    res = _train(tmp_path, t5, "t2t/glue/sst2", glue_dir, steps=40, lr=3e-3)
    _assert_falls(res)
    m = _eval(tmp_path / "out", "t2t/glue/sst2", glue_dir)
    assert set(m) == {"accuracy", "invalid_rate"}
    assert m["invalid_rate"] < 0.5  # it learned to answer with a label word


def test_masked_lm_perplexity(tmp_path, tiny_bert):
    data = make_text_folder(tmp_path / "text")
    task = f"text:{data}"
    res = _train(tmp_path, tiny_bert, task, None, steps=30, lr=3e-3, batch=8, max_len=32)
    _assert_falls(res)
    a = _eval(tmp_path / "out", task, None)
    b = _eval(tmp_path / "out", task, None)
    assert set(a) == {"perplexity", "loss", "masked_tokens"}
    assert a == b  # fixed masking: the same numbers twice
    assert a["perplexity"] == pytest.approx(np.exp(a["loss"]))
    assert a["perplexity"] < 30  # a tiny repetitive corpus; an untrained head is ~ vocabulary size (~100)


def test_gpt2_sequence_classification_pads(tmp_path, glue_dir):
    """Decoder-only classification: the loader sets a pad token, batched (padded) and one-by-one
    predictions agree (the head reads the last non-pad token)."""
    from mergekit_lab.evaluation import predict
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.settings import ModelSettings
    from mergekit_lab.tasks import get_task

    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    res = _train(tmp_path, gpt2, "glue/sst2", glue_dir, steps=40, lr=3e-3)
    _assert_falls(res)
    task = get_task("glue/sst2")
    model = task.load_trained(str(tmp_path / "out"))
    assert model.config.pad_token_id is not None
    tok = load_tokenizer(ModelSettings(name_or_path=str(tmp_path / "out")))
    from datasets import Dataset

    texts = ["good", "the movie was bad", "a really very dull boring plot", "great film", "awful"] * 2
    ds = task.encode(Dataset.from_dict({"sentence": texts, "label": [1, 0, 0, 1, 0] * 2}), tok, 64)
    lens = {len(x) for x in ds["input_ids"]}
    assert len(lens) > 1  # padding happens in the batch
    batched, _, _ = predict(model, ds, task.collator(tok), batch_size=12)
    single, _, _ = predict(model, ds, task.collator(tok), batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    m = _eval(tmp_path / "out", "glue/sst2", glue_dir)
    assert set(m) == {"accuracy"}
