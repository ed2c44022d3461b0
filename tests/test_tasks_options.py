"""Per-task defaults of --max-seq-length (unset = the task's own: 128, QA 384) and --k-shot being
refused where "K examples per class" has no meaning (NER, QA, masked LM)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mergekit_lab.cli.app import app
from tests.test_tasks_factories import make_ner_folder, make_squad_json, make_text_folder

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "saw", "movie", "film"]


def _long_squad(folder, n_words: int = 700):
    """Two questions over a context of ``n_words`` in-vocabulary words (longer than 384 tokens)."""
    ctx = " ".join(WORDS[i % len(WORDS)] for i in range(n_words)) + " . john lives in paris ."
    qas = [{"id": "q0", "question": "who lives in paris ?",
            "answers": [{"text": "john", "answer_start": ctx.index("john")}]},
           {"id": "q1", "question": "where john lives ?",
            "answers": [{"text": "paris", "answer_start": ctx.index("paris")}]}]
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas}]}]}
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (folder / name).write_text(json.dumps(data))
    return folder


def _encode(task_name, data_dir, tiny_bert, **data):
    from mergekit_lab.data import load_task_data
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.settings import DataSettings, ModelSettings
    from mergekit_lab.tasks import get_task

    tok = load_tokenizer(ModelSettings(name_or_path=str(tiny_bert)))
    d = DataSettings(task=task_name, data_dir=str(data_dir), **data)
    return load_task_data(get_task(task_name), "validation", d, tok)


def test_qa_window_length_follows_the_flag_and_defaults_to_384(tmp_path, tiny_bert):
    from mergekit_lab.tasks.qa import QA_MAX_LEN

    d = _long_squad(tmp_path / "squad")
    default = _encode("qa/squad", d, tiny_bert)
    explicit = _encode("qa/squad", d, tiny_bert, max_seq_length=128)
    assert max(len(x) for x in default["input_ids"]) == QA_MAX_LEN == 384
    assert max(len(x) for x in explicit["input_ids"]) == 128  # an explicit 128 is no longer read as "default"
    assert len(explicit) > len(default) >= 2 * 2  # shorter windows: more of them per question
    # the answer is still found in some 128-token window
    assert any(s > 0 for s in explicit["start_positions"])


def test_classification_defaults_to_128_and_honours_the_flag(tmp_path, tiny_bert):
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    long = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    for name in ("train.tsv", "dev.tsv"):
        (d / name).write_text(f"sentence\tlabel\n{long}\t1\nthe film\t0\n")
    assert max(len(x) for x in _encode("glue/sst2", d.parent, tiny_bert)["input_ids"]) == 128
    assert max(len(x) for x in _encode("glue/sst2", d.parent, tiny_bert, max_seq_length=40)["input_ids"]) == 40


def test_task_defaults_and_the_resolver():
    from mergekit_lab.data import resolve_max_seq_length
    from mergekit_lab.settings import DataSettings
    from mergekit_lab.tasks import get_task

    expected = {"glue/sst2": 128, "ner/conll2003": 128, "text:corpus": 128, "t2t/glue/rte": 128, "qa/squad": 384,
                "superglue/boolq": 256, "t2t/superglue/boolq": 256, "superglue/cb": 128}
    for name, n in expected.items():
        task = get_task(name)
        assert resolve_max_seq_length(task, DataSettings()) == n, name
        assert resolve_max_seq_length(task, None) == n, name
        assert resolve_max_seq_length(task, DataSettings(max_seq_length=64)) == 64, name


runner = CliRunner()


def test_print_config_shows_null_and_round_trips(tmp_path):
    r = runner.invoke(app, ["train", "--task", "qa/squad", "--print-config"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.stdout)
    assert cfg["data"]["max_seq_length"] is None  # unset: the task decides (384 for QA)
    (tmp_path / "c.yaml").write_text(r.stdout)
    r2 = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--max-seq-length", "128",
                             "--print-config"], catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    assert yaml.safe_load(r2.stdout)["data"]["max_seq_length"] == 128
    h = runner.invoke(app, ["train", "--help"], catch_exceptions=False, terminal_width=400)
    assert "384 for qa" in " ".join(h.stdout.split())


@pytest.mark.parametrize("family", ["ner", "qa", "mlm", "regression"])
def test_k_shot_is_refused_where_classes_do_not_exist(tmp_path, tiny_bert, family):
    if family == "ner":
        task, data = f"ner/file:{make_ner_folder(tmp_path / 'ner', n_train=8, n_dev=4)}", []
    elif family == "qa":
        make_squad_json(tmp_path / "squad" / "train-v1.1.json", n=4)
        task, data = "qa/squad", ["--data-dir", str(tmp_path / "squad")]
    elif family == "mlm":
        task, data = f"text:{make_text_folder(tmp_path / 'text', n_lines=8)}", []
    else:
        task, data = "glue/stsb", ["--data-dir", str(tmp_path)]
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", "--model", str(tiny_bert), "--task", task, *data, "--k-shot", "4",
                            "--output-dir", str(out), "--max-steps", "1", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "--k-shot 4" in lines[0] and "--max-train-samples" in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert not out.exists()


def test_mlm_eval_of_a_headless_encoder_is_reproducible(tmp_path, tiny_bert):
    """tiny_bert is saved with a classification head only (as builtin:minilm has no MLM head): the
    missing head is initialised under a fixed seed, so two evaluations agree exactly."""
    from mergekit_lab.cli.eval import EvalSettings, run_eval

    text = make_text_folder(tmp_path / "text", n_lines=20)
    s = EvalSettings(run={"quiet": True}, model={"name_or_path": [str(tiny_bert)]},
                     data={"task": [f"text:{text}"], "max_seq_length": 32}, eval={"per_device_eval_batch_size": 16})
    a = run_eval(s)["rows"][0]["metrics"]
    b = run_eval(s)["rows"][0]["metrics"]
    assert a == b and a["masked_tokens"] > 0
