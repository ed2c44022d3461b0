"""Integration on the real data in ../shared/data (skipped when absent): MiniLM on a slice of
CoNLL-2003 learns entities; extractive QA on the 500-question SQuAD subset runs end to end."""

from __future__ import annotations

import pytest

from tests.test_tasks_train import _losses


def _train(tmp, task, data_dir, *, steps, lr, batch, max_len, n_train, n_eval):
    from mergekit_lab.cli.train import TrainSettings, train_model

    s = TrainSettings(
        run={"output_dir": str(tmp / "out"), "seed": 0, "quiet": True},
        model={"name_or_path": "builtin:minilm"},
        data={"task": task, "data_dir": str(data_dir), "max_seq_length": max_len, "max_train_samples": n_train,
              "max_eval_samples": n_eval},
        training={"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": batch, "warmup_ratio": 0.1,
                  "logging_steps": 5, "per_device_eval_batch_size": 64},
    )
    return train_model(s)


def test_minilm_conll_slice_reaches_sensible_entity_f1(tmp_path, shared_data):
    # 15 steps of 16 sentences (window 32) at a high lr: about half the cost of the earlier 40 x 12
    # at 48 tokens; measured F1 0.31 on these 64 dev sentences (0.34 with 40 x 12)
    res = _train(tmp_path, "ner/conll2003", shared_data, steps=15, lr=8e-4, batch=16, max_len=32,
                 n_train=240, n_eval=64)
    m = res["metrics"]["validation"]
    losses = _losses(res)
    assert losses[-1] < 0.5 * losses[0], losses
    # an untrained head scores ~0 (random tags); broken alignment or decoding stays far below this bar
    assert m["f1"] > 0.2, m
    assert 0 < m["precision"] <= 1 and 0 < m["recall"] <= 1


def test_squad_subset_end_to_end(tmp_path, shared_data):
    res = _train(tmp_path, "qa/squad", shared_data / "squad", steps=4, lr=1e-4, batch=4, max_len=192,
                 n_train=None, n_eval=16)
    m = res["metrics"]["validation"]
    assert set(m) == {"f1", "exact_match"}
    assert 0.0 <= m["exact_match"] <= m["f1"] <= 1.0
    assert res["train_examples"] >= 500  # one window or more per question
    assert res["eval_examples"] >= 16
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("task", ["ner/wnut17", "ner/conll2003+plo"])
def test_real_ner_sources_load(shared_data, task):
    from mergekit_lab.tasks import get_task

    t = get_task(task)
    ds = t.load("validation", shared_data)
    assert len(ds) == {"ner/wnut17": 1009, "ner/conll2003+plo": 3250}[task]
    assert len(ds[0]["tokens"]) == len(ds[0]["label"])
