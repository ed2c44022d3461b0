"""`mklab prompt-tune` end to end on tiny local stand-ins (BERT, T5, GPT-2), adapter evaluation,
k-shot sampling and the CLI's errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergekit_lab.cli.app import app
from mergekit_lab.errors import UserError
from mergekit_lab.prompt.run import evaluate_prompt_adapter
from mergekit_lab.settings import DataSettings, ModelSettings
from mergekit_lab.tasks import get_task
from tests.factories import make_tokenizer

runner = CliRunner()
D = 32


def _invoke(args: list[str]):
    res = runner.invoke(app, ["prompt-tune", *args, "--quiet"])
    return res


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 2-layer T5 (d 32) with the factories' WordPiece tokenizer: an offline T5 stand-in."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-t5")
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=D,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        d_kv=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=D, n_layer=2, n_head=2, n_positions=128, pad_token_id=tok.pad_token_id
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def test_dept_on_bert_classifier_end_to_end(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "dept"
    res = _invoke(
        [
            "--method",
            "dept",
            "--model",
            str(tiny_bert),
            "--task",
            "glue/sst2",
            "--data-dir",
            str(glue_dir),
            "--match-pt-length",
            "10",
            "--max-seq-length",
            "24",
            "--max-steps",
            "6",
            "--eval-steps",
            "3",
            "--per-device-train-batch-size",
            "8",
            "--lora-embedding-lr",
            "1e-2",
            "--output-dir",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    p = data["prompt"]
    # m*d + r*(s+d) == 10*d exactly, plus the 2-class head
    assert p["m"] * D + p["r"] * (24 + D) == 10 * D
    assert data["metrics"]["trainable_params"] == p["trainable_params"] == 10 * D + (D * 2 + 2)
    assert (p["m"], p["r"]) in {(o["m"], o["r"]) for o in p["match_pt_length"]["options"]}
    assert p["learning_rates"]["prompt"] == 0.3 and p["learning_rates"]["lora_embedding"] == 1e-2
    t = data["timing"]
    assert (
        t["steps"] == 6 and t["seconds_per_step"] > 0 and t["tokens_per_second"] > 0 and t["train_tokens"] > 0
    )
    assert data["peak_memory_mb"]["rss"] > 0
    assert [h["step"] for h in data["training"]["history"] if "eval_accuracy" in h] == [3, 6]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DEPT" and cfg["max_length"] == 24
    # `mklab eval --adapter DIR` path (base model read from the folder): the saved best module
    # reproduces the best dev metric
    assert cfg["base_model_name_or_path"] == str(tiny_bert)
    metrics = evaluate_prompt_adapter(
        ModelSettings(),
        out,
        get_task("glue/sst2"),
        "validation",
        DataSettings(task="glue/sst2", data_dir=str(glue_dir)),  # default 128 > s: clamped to the module's 24
        batch_size=16,
    )
    assert metrics["accuracy"] == pytest.approx(data["metrics"]["validation"]["accuracy"], abs=1e-9)
    # parameter-efficient transfer: a new run starts from the trained module
    out2 = tmp_path / "transfer"
    res = _invoke(
        [
            "--method",
            "dept",
            "--model",
            str(tiny_bert),
            "--task",
            "glue/sst2",
            "--data-dir",
            str(glue_dir),
            "--match-pt-length",
            "10",
            "--max-seq-length",
            "24",
            "--max-steps",
            "1",
            "--init-from",
            str(out),
            "--output-dir",
            str(out2),
        ]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "results.json").read_text())["prompt"]["prompt_init"] == "init_from"


def test_pt_on_t5_text_to_text_stand_in(tiny_t5_dir, glue_dir, tmp_path):
    out = tmp_path / "pt-t5"
    res = _invoke(
        [
            "--method",
            "pt",
            "--model",
            str(tiny_t5_dir),
            "--task",
            "glue/sst2",
            "--data-dir",
            str(glue_dir),
            "--prefix-length",
            "5",
            "--max-seq-length",
            "24",
            "--max-steps",
            "4",
            "--eval-steps",
            "4",
            "--per-device-train-batch-size",
            "8",
            "--max-eval-samples",
            "16",
            "--output-dir",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    # an encoder-decoder model trains on the registry's text-to-text form of the task
    assert data["task"]["format"] == "text2text" and data["task"]["name"] == "t2t/glue/sst2"
    assert "invalid_rate" in data["metrics"]["validation"]
    assert data["metrics"]["trainable_params"] == 5 * D  # no head, no unused PEFT rows
    assert 0.0 <= data["metrics"]["validation"]["accuracy"] <= 1.0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "SEQ_2_SEQ_LM"
    metrics = evaluate_prompt_adapter(
        ModelSettings(name_or_path=str(tiny_t5_dir)),
        out,
        get_task("glue/sst2"),
        "validation",
        DataSettings(task="glue/sst2", data_dir=str(glue_dir), max_seq_length=24, max_eval_samples=16),
    )
    assert metrics["accuracy"] == pytest.approx(data["metrics"]["validation"]["accuracy"], abs=1e-9)


def test_dept_on_gpt2_stand_in_with_k_shot(tiny_gpt2_dir, glue_dir, tmp_path):
    out = tmp_path / "dept-gpt2"
    res = _invoke(
        [
            "--method",
            "dept",
            "--model",
            str(tiny_gpt2_dir),
            "--task",
            "glue/sst2",
            "--data-dir",
            str(glue_dir),
            "--prefix-length",
            "4",
            "--r",
            "2",
            "--max-seq-length",
            "24",
            "--k-shot",
            "8",
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            "8",
            "--prompt-init",
            "vocab",
            "--output-dir",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["train_examples"] == 16  # 8 per class
    assert data["metrics"]["trainable_params"] == 4 * D + 2 * (24 + D) + 2 * D  # GPT-2 score head has no bias


def test_k_shot_sampling_is_balanced_and_reproducible(tiny_bert, glue_dir):
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer

    tok = load_tokenizer(ModelSettings(name_or_path=str(tiny_bert)))
    task = get_task("glue/sst2")
    data = DataSettings(task="glue/sst2", data_dir=str(glue_dir))
    a = load_task_data(task, "train", data, tok, seed=1, k_shot=5)
    b = load_task_data(task, "train", data, tok, seed=1, k_shot=5)
    c = load_task_data(task, "train", data, tok, seed=2, k_shot=5)
    assert Counter(a["labels"]) == {0: 5, 1: 5}
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]


def test_cli_errors_are_one_line_exit_2(tiny_bert, glue_dir, tmp_path):
    base = [
        "--model",
        str(tiny_bert),
        "--task",
        "glue/sst2",
        "--data-dir",
        str(glue_dir),
        "--max-steps",
        "1",
        "--output-dir",
        str(tmp_path / "x"),
    ]
    res = _invoke(
        [*base, "--method", "dept", "--match-pt-length", "10", "--max-seq-length", "24", "--r", "5"]
    )
    assert res.exit_code == 2 and "needs r=" in res.output
    res = _invoke([*base, "--prefix-length", "120", "--max-seq-length", "24"])
    assert res.exit_code == 2 and "positions" in res.output  # 120 + 24 > 128 positions of the tiny BERT
    res = _invoke([*base, "--max-seq-length", "24", "--init-from", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "adapter_config.json" in res.output


def test_presets_resolve(tmp_path):
    from mergekit_lab.prompt.settings import PromptTuneSettings
    from mergekit_lab.settings import load_settings

    s = load_settings(
        PromptTuneSettings, command="prompt-tune", preset="dept-t5-base-glue", templates=["task=rte"]
    )
    assert s.data.task == "glue/rte" and s.prompt.method == "dept"
    assert (s.prompt.prefix_length, s.prompt.r, s.data.max_seq_length) == (60, 30, 256)
    assert s.training.per_device_train_batch_size == 32 and s.training.max_steps >= 30000
    pt = load_settings(
        PromptTuneSettings, command="prompt-tune", preset="pt-t5-base-glue", templates=["task=rte"]
    )
    assert pt.prompt.method == "pt" and pt.prompt.prefix_length == 100
    sg = load_settings(
        PromptTuneSettings, command="prompt-tune", preset="dept-t5-base-superglue", templates=["task=cb"]
    )
    assert sg.data.task == "superglue/cb"
    q = load_settings(PromptTuneSettings, command="prompt-tune", preset="dept-quickstart")
    assert q.model.name_or_path == "builtin:minilm" and q.data.data_dir == "builtin:sample"
    with pytest.raises(UserError):
        load_settings(
            PromptTuneSettings, command="prompt-tune", preset="dept-t5-base-glue"
        )  # {task} unfilled


def test_text2text_hook_scores_labels_by_likelihood(tiny_t5_dir, glue_dir):
    """The fallback hook (used when no t2t/ task is registered): rank classification by the summed
    log-likelihood of each label string equals -(mean token loss) * target length."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from mergekit_lab.prompt import build_prompt_model
    from mergekit_lab.prompt.text2text import (
        encode_t2t,
        label_scores,
        label_words,
        make_t2t_collator,
        source_text,
    )

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    task = get_task("glue/sst2")
    ds = encode_t2t(task, task.load("validation", glue_dir).select(range(4)), tok, 24)
    assert source_text(task, {"sentence": "a fine film"}) == "sst2 sentence: a fine film"
    batch = make_t2t_collator(tok)([ds[i] for i in range(4)])
    model = build_prompt_model(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
        "dept",
        num_virtual_tokens=3,
        r=2,
        max_length=24,
        init="vocab",
    ).eval()
    targets = [list(tok(w)["input_ids"]) for w in label_words(task)]
    scores = label_scores(model, batch["input_ids"], batch["attention_mask"], targets)
    for c, ids in enumerate(targets):
        for i in range(4):
            with torch.no_grad():
                loss = model(
                    input_ids=batch["input_ids"][i : i + 1],
                    attention_mask=batch["attention_mask"][i : i + 1],
                    labels=torch.tensor([ids]),
                ).loss
            assert scores[i, c].item() == pytest.approx(-loss.item() * len(ids), rel=1e-4)
