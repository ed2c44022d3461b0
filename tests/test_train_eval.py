"""Training, evaluation, resume, the zoo, metrics and tasks on tiny models built offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergekit_lab.cli.app import app
from mergekit_lab.cli.train import TrainSettings, train_model
from mergekit_lab.errors import UserError
from mergekit_lab.evaluation.metrics import compute
from mergekit_lab.settings import load_settings
from mergekit_lab.tasks import get_task

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def settings_for(tiny_bert, glue_dir, out, **training):
    train = {"learning_rate": 2e-3, "num_train_epochs": 8, "per_device_train_batch_size": 16, "logging_steps": 6}
    train.update(training)
    return load_settings(TrainSettings, flags={
        "name_or_path": str(tiny_bert), "task": "glue/sst2", "data_dir": str(glue_dir), "output_dir": out,
        "quiet": True, **train})


def test_training_reduces_loss_and_reload_predicts_identically(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "run"
    res = train_model(settings_for(tiny_bert, glue_dir, out))
    losses = [h["loss"] for h in res["training"]["history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    assert res["metrics"]["validation"]["accuracy"] > 0.8
    assert (out / "model.safetensors").exists() and (out / "results.json").exists()
    assert not (out.parent / ".run.incomplete").exists()
    data = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "command", "settings", "versions", "start_time", "end_time", "wall_seconds",
                "peak_memory_mb", "metrics", "artifacts"):
        assert key in data
    # eval of the saved folder reproduces the training-time validation metric exactly
    r = runner.invoke(app, ["eval", "--model", str(out), "--task", "glue/sst2", "--data-dir", str(glue_dir),
                            "--output-dir", str(tmp_path / "ev"), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["rows"][0]["metrics"]["accuracy"] == pytest.approx(res["metrics"]["validation"]["accuracy"])
    # the reloaded model gives identical logits to the in-memory one
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    m1 = AutoModelForSequenceClassification.from_pretrained(out).eval()
    m2 = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tok(["a very good movie", "an awful boring plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(m1(**batch).logits, m2(**batch).logits)


class Interrupt(Exception):
    pass


def test_resume_continues_from_checkpoint(tiny_bert, glue_dir, tmp_path):
    """An interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    from mergekit_lab.training import loop

    kw = {"max_steps": 12, "save_steps": 4, "num_train_epochs": 1, "per_device_train_batch_size": 16}
    full = tmp_path / "full"
    train_model(settings_for(tiny_bert, glue_dir, full, **kw))

    part = tmp_path / "part"
    orig_fit = loop.fit

    def interrupted_fit(*a, **k):
        def stop(state):
            if state.global_step == 6:
                raise Interrupt()
        k["callbacks"] = [stop]
        return orig_fit(*a, **k)

    import mergekit_lab.training as training_pkg

    training_pkg.fit = interrupted_fit
    try:
        with pytest.raises(Interrupt):
            train_model(settings_for(tiny_bert, glue_dir, part, **kw))
    finally:
        training_pkg.fit = orig_fit
    assert not part.exists()
    ck = tmp_path / ".part.incomplete" / "checkpoints" / "step-4"
    assert (ck / "state.json").exists()
    s = settings_for(tiny_bert, glue_dir, part, **kw)
    s.run.resume = True
    res = train_model(s)
    assert res["training"]["resumed_from"] == 4
    assert res["training"]["global_step"] == 12
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_zoo_reuses_matching_model(tiny_bert, glue_dir, tmp_path):
    zoo = tmp_path / "zoo"
    args = ["train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(glue_dir), "--max-steps", "2",
            "--zoo-dir", str(zoo), "--output-dir", str(tmp_path / "a"), "--quiet"]
    r1 = runner.invoke(app, args, catch_exceptions=False)
    assert r1.exit_code == 0, r1.output
    entries = [p for p in zoo.iterdir() if p.is_dir()]
    assert len(entries) == 1
    mtime = (entries[0] / "model.safetensors").stat().st_mtime_ns
    args2 = [*args[:-3], "--output-dir", str(tmp_path / "b")]
    r2 = runner.invoke(app, args2, catch_exceptions=False)
    assert r2.exit_code == 0
    assert "reusing" in r2.stderr or "reused" in r2.stderr
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == mtime
    assert (tmp_path / "b" / "model.safetensors").exists()
    # a different seed is a different zoo entry; --retrain retrains the same key
    r3 = runner.invoke(app, [*args2[:-2], "--seed", "5", "--output-dir", str(tmp_path / "c")], catch_exceptions=False)
    assert r3.exit_code == 0 and len([p for p in zoo.iterdir() if p.is_dir()]) == 2
    r4 = runner.invoke(app, [*args2[:-2], "--retrain", "--output-dir", str(tmp_path / "d")], catch_exceptions=False)
    assert r4.exit_code == 0 and (entries[0] / "model.safetensors").stat().st_mtime_ns != mtime


def test_metrics_against_hand_computed_values():
    y = np.array([1, 0, 1, 1, 0, 1])
    p = np.array([1, 0, 0, 1, 1, 1])
    assert compute("accuracy", p, y) == pytest.approx(4 / 6)
    # tp=3 fp=1 fn=1 -> precision 3/4 recall 3/4 -> f1 3/4
    assert compute("f1", p, y) == pytest.approx(0.75)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (3*1-1*1)/sqrt(4*4*2*2) = 2/8
    assert compute("matthews_correlation", p, y) == pytest.approx(0.25)
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([2.0, 4.0, 6.0, 9.0])
    mean_a, mean_b = a.mean(), b.mean()
    r = ((a - mean_a) * (b - mean_b)).sum() / np.sqrt(((a - mean_a) ** 2).sum() * ((b - mean_b) ** 2).sum())
    assert compute("pearson", a, b) == pytest.approx(r)
    assert compute("spearman", a, b) == pytest.approx(1.0)
    # macro-F1, single label: class 0 f1 = 1/2 (tp1 fp1 fn1), class 1 f1 = 3/4 -> 0.625
    assert compute("macro_f1", p, y) == pytest.approx(0.625)
    # multi-label with a mask: label 0 f1=1, label 1 f1 = 0 (its only annotated example is wrong), label 2 absent
    pred = np.array([[1, 1, 0], [0, 0, 1]])
    gold = np.array([[1, 0, 0], [0, 1, 1]])
    mask = np.array([[1, 0, 0], [1, 1, 0]])
    assert compute("macro_f1", pred, gold, mask) == pytest.approx(0.5)


def test_emotion_loss_ignores_masked_labels():
    task = get_task("emotion/isear")
    assert task.num_labels == 16 and task.problem_type == "multi_label_classification"
    torch.manual_seed(0)
    logits = torch.randn(3, 16)
    labels = torch.randint(0, 2, (3, 16)).float()
    mask = torch.zeros(3, 16)
    mask[:, :5] = 1
    base = task.loss(logits, labels, mask)
    # changing labels or logits where the mask is 0 does not change the loss
    labels2, logits2 = labels.clone(), logits.clone()
    labels2[:, 5:] = 1 - labels2[:, 5:]
    logits2[:, 5:] += 10
    assert torch.allclose(base, task.loss(logits2, labels2, mask))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :5], labels[:, :5])
    assert torch.allclose(base, ref)


def test_emotion_record_encoding():
    from mergekit_lab.tasks.emotion import LABELS, encode_record

    rec = {"text": "x", "emotions": {"joy": 1, "anger": 0, "trust": None}, "VAD": {"valence": 3.4, "arousal": 2.0}}
    y, m = encode_record(rec, "t")
    assert y[LABELS.index("joy")] == 1 and m[LABELS.index("joy")] == 1
    assert m[LABELS.index("trust")] == 0 and m[LABELS.index("sadness")] == 0
    assert y[LABELS.index("valence")] == 1 and y[LABELS.index("arousal")] == 0 and m[LABELS.index("dominance")] == 0


def test_glue_quirks_bom_and_headerless(tmp_path):
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    text = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"hi\t\"Hi\" he said\n"
    (mrpc / "train.tsv").write_text(text, encoding="utf-8")
    ds = get_task("glue/mrpc").load("train", tmp_path)
    assert ds[0] == {"sentence1": 'He said "hi', "sentence2": '"Hi" he said', "label": 1}
    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "dev.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ds = get_task("glue/cola").load("dev", tmp_path)
    assert ds["sentence"] == ["The cat sat.", "Cat the sat."] and ds["label"] == [1, 0]
    rte = tmp_path / "RTE"
    rte.mkdir()
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n")
    assert get_task("glue/rte").load("validation", tmp_path)["label"] == [1]


def test_file_task_and_k_shot(tmp_path):
    from mergekit_lab.data import k_shot_indices

    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{'pos' if i % 3 else 'neg'}\n" for i in range(30)))
    task = get_task(f"file:{f}")
    assert task.label_names == ["neg", "pos"]
    ds = task.load("train")
    labels = ds["label"]
    idx = k_shot_indices(labels, 4, seed=1)
    assert sorted(np.bincount([labels[i] for i in idx]).tolist()) == [4, 4]
    assert idx == k_shot_indices(labels, 4, seed=1) and idx != k_shot_indices(labels, 4, seed=2)
    with pytest.raises(UserError, match="does not exist"):
        get_task(f"file:{tmp_path / 'missing.csv'}")


def test_builtin_sample_loads():
    ds = get_task("glue/cola").load("validation", "builtin:sample")
    assert len(ds) == 400 and set(ds["label"]) <= {0, 1}


@pytest.mark.slow
def test_torchrun_two_processes(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "ddp"
    mklab = shutil.which("mklab") or str(Path(sys.executable).parent / "mklab")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "--no-python", mklab, "train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir",
           str(glue_dir), "--max-steps", "3", "--per-device-train-batch-size", "8", "--output-dir", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["training"]["global_step"] == 3
    # each of the 2 processes saw 8 examples per step
    assert data["training"]["samples_per_second"] > 0
    assert len(list(tmp_path.glob("ddp*"))) == 1


@pytest.mark.integration
def test_minilm_sst2_integration(shared_data, tmp_path):
    out = tmp_path / "sst2"
    r = runner.invoke(app, ["train", "--model", "builtin:minilm", "--task", "glue/sst2", "--data-dir",
                            str(shared_data / "glue"), "--max-train-samples", "800", "--max-eval-samples", "200",
                            "--num-train-epochs", "1", "--learning-rate", "1e-4", "--warmup-ratio", "0.1",
                            "--max-seq-length", "64",
                            "--output-dir", str(out), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    acc = json.loads((out / "results.json").read_text())["metrics"]["validation"]["accuracy"]
    assert acc > 0.6  # chance is 0.5; a few hundred examples already move MiniLM well past it


def test_zoo_key_resolves_the_task_default_sequence_length():
    """An unset --max-seq-length and the task's default given explicitly are the same training,
    so they share one zoo entry; another length is another entry."""
    from mergekit_lab.cli.train import TrainSettings
    from mergekit_lab.models.zoo import zoo_key
    from mergekit_lab.settings import load_settings

    def key(*sets):
        return zoo_key(load_settings(TrainSettings, sets=["model.name_or_path=builtin:minilm", *sets]))

    assert key("data.task=glue/sst2") == key("data.task=glue/sst2", "data.max_seq_length=128")
    assert key("data.task=glue/sst2") != key("data.task=glue/sst2", "data.max_seq_length=64")
    assert key("data.task=qa/squad") == key("data.task=qa/squad", "data.max_seq_length=384")
