"""Similarity scoring of text-to-text T5 modules (t2t/ tasks) on a tiny T5: every measure against a
direct computation, a source identical to the target's module wins under every measure, the
`mklab similarity` CLI flow (scores, weights, bar chart, leave-one-out heatmap, merge, --peft-init),
and clear errors for pools that mix T5 and classifier modules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergekit_lab.similarity.measures import PAPER_MEASURES, seq2seq_token_stats

TARGET = "t2t/glue/sst2"
TUNE = {"max_steps": 12, "learning_rate": 3e-2, "per_device_train_batch_size": 16, "lr_scheduler_type": "constant",
        "per_device_eval_batch_size": 16}


def _settings(pool, glue_dir, out, target=TARGET, **sim):
    from mergekit_lab.similarity.settings import SimilaritySettings

    return SimilaritySettings.model_validate({
        "run": {"output_dir": str(out), "quiet": True, "seed": 7},
        "data": {"task": target, "data_dir": str(glue_dir), "max_eval_samples": 24},
        "training": TUNE,
        "similarity": {"pool": [str(pool)], **sim}})


def _tiny_t5(folder):
    """The task-family tests' tiny T5 (word-level tokenizer) without dropout, so grand is deterministic."""
    from transformers import T5Config, T5ForConditionalGeneration

    from tests.test_tasks_factories import make_word_tokenizer

    tok = make_word_tokenizer(folder, t5=True)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8,
                   dropout_rate=0.0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_pool(glue_dir, tmp_path_factory):
    """A T5 backbone fine-tuned on toy t2t/glue/sst2 (a frozen random tiny T5 learns too slowly) and
    a LoRA pool: same = exactly the reference module the scorer tunes, far1/far2 = it plus noise."""
    from transformers import T5ForConditionalGeneration

    from mergekit_lab.cli.train import TrainSettings, train_model
    from tests.factories import make_noised_lora_pool

    root = tmp_path_factory.mktemp("t5pool")
    t5 = _tiny_t5(root / "t5")
    train_model(TrainSettings.model_validate({
        "run": {"output_dir": str(root / "backbone"), "quiet": True},
        "model": {"name_or_path": str(t5)}, "data": {"task": TARGET, "data_dir": str(glue_dir), "max_eval_samples": 8},
        "training": {"max_steps": 40, "learning_rate": 3e-3, "per_device_train_batch_size": 16}}))
    pool, ref = make_noised_lora_pool(root, root / "backbone", T5ForConditionalGeneration,
                                      lambda pool: _settings(pool, glue_dir, root / "unused"), TARGET, "t2t/glue/",
                                      {"same": 0.0, "far1": 1.0, "far2": 2.0})
    assert ref.head == {} and ref.model is not None  # T5: no head, the reference model is kept for kl
    return pool


def test_token_stats_against_numpy():
    rng = np.random.default_rng(0)
    logits, ref = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
    labels = np.array([[4, 1, -100], [2, 6, 1]])
    st = seq2seq_token_stats(torch.tensor(logits), torch.tensor(labels), torch.tensor(ref))
    for i in range(2):
        want = {"tokens": 0.0, "ce": 0.0, "el2n": 0.0, "cos": 0.0, "kl": 0.0}
        for t in range(3):
            y = labels[i, t]
            if y == -100:
                continue
            p = np.exp(logits[i, t]) / np.exp(logits[i, t]).sum()
            q = np.exp(ref[i, t]) / np.exp(ref[i, t]).sum()
            onehot = np.eye(7)[y]
            want["tokens"] += 1
            want["ce"] += -math.log(p[y])
            want["el2n"] += np.linalg.norm(p - onehot)
            want["cos"] += p @ onehot / (np.linalg.norm(p) * np.linalg.norm(onehot))
            want["kl"] += (q * (np.log(q) - np.log(p))).sum()
        for k, v in want.items():
            assert float(st[k][i]) == pytest.approx(v, rel=1e-5, abs=1e-6), (k, i)


def test_t5_measures_against_direct_computation(t5_pool, glue_dir, tmp_path):
    """Each registered measure on the tiny T5 equals a computation written out here."""
    from peft import set_peft_model_state_dict
    from transformers import T5ForConditionalGeneration

    from mergekit_lab.delta import attach_module, read_module
    from mergekit_lab.delta.modules import apply_folder_config
    from mergekit_lab.similarity.measures import get_measure
    from mergekit_lab.similarity.run import build_context, collect_pool
    from mergekit_lab.tasks import get_task

    pool = collect_pool([t5_pool])
    src = next(m for m in pool if m.name == "far1")
    ctx = build_context(_settings(t5_pool, glue_dir, tmp_path), TARGET, pool, True)
    assert ctx.seq2seq
    backbone = src.base_model
    batch = ctx.collate([ctx.dev[i] for i in range(len(ctx.dev))])  # the whole scored set in one batch
    labels = batch["labels"]
    model = attach_module(T5ForConditionalGeneration.from_pretrained(backbone), src)
    with torch.no_grad():
        out = model(**batch)
    # loss: T5's own seq2seq cross-entropy over every target token
    assert get_measure("loss").fn(ctx, src).value == pytest.approx(float(out.loss), rel=1e-5)
    # el2n / cos / kl: full-vocabulary distributions at the target tokens, summed per example
    p = out.logits.softmax(-1).double().numpy()
    y = labels.numpy()
    ref = ctx.reference.model
    with torch.no_grad():
        q = ref(**batch).logits.softmax(-1).double().numpy()
    el, co, kl = [], [], []
    for i in range(len(y)):
        pos = np.nonzero(y[i] != -100)[0]
        oh = np.eye(p.shape[-1])[y[i, pos]]
        el.append(np.linalg.norm(p[i, pos] - oh, axis=-1).sum())
        co.append(((p[i, pos] * oh).sum(-1) / np.linalg.norm(p[i, pos], axis=-1)).sum())
        kl.append((q[i, pos] * (np.log(q[i, pos]) - np.log(p[i, pos]))).sum())
    assert get_measure("el2n").fn(ctx, src).value == pytest.approx(np.mean(el), rel=1e-4)
    assert get_measure("cos_logits_labels").fn(ctx, src).value == pytest.approx(np.mean(co), rel=1e-4)
    assert get_measure("kl").fn(ctx, src).value == pytest.approx(np.mean(kl), rel=1e-3, abs=1e-5)
    # grand: autograd on each batch of the scored set (no dropout in this T5), averaged
    g = get_measure("grand").fn(ctx, src).value
    m2 = attach_module(T5ForConditionalGeneration.from_pretrained(backbone), src, trainable=True)
    m2.train()
    norms = []
    for lo in range(0, len(ctx.dev), ctx.batch_size):
        b = ctx.collate([ctx.dev[i] for i in range(lo, min(lo + ctx.batch_size, len(ctx.dev)))])
        m2.zero_grad()
        m2(**b).loss.backward()
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for n, p in m2.named_parameters()
                                   if p.requires_grad and p.grad is not None)))
    assert len(norms) == 2 and g == pytest.approx(np.mean(norms), rel=1e-4)
    # euclidean: the short tune starts at the source's tensors; sum of Frobenius norms of the move
    tuned = ctx.tuned(src)
    folder = read_module(src.path).tensors()
    assert set(tuned.before) == set(folder)
    for k in folder:
        torch.testing.assert_close(tuned.before[k], folder[k])
    want = sum(float((tuned.after[k] - folder[k]).norm()) for k in folder)
    assert want > 0 and get_measure("euclidean").fn(ctx, src).value == pytest.approx(want, rel=1e-6)
    # performance: generated-answer accuracy of the tuned module minus the backbone's
    task = get_task(TARGET)
    tok = ctx.tokenizer
    tuned_model = apply_folder_config(T5ForConditionalGeneration.from_pretrained(backbone), src)
    set_peft_model_state_dict(tuned_model, tuned.after)
    after_acc = task.evaluate(tuned_model.eval(), ctx.dev, tok)["accuracy"]
    zero_acc = task.evaluate(T5ForConditionalGeneration.from_pretrained(backbone).eval(), ctx.dev, tok)["accuracy"]
    assert get_measure("performance").fn(ctx, src).value == pytest.approx(after_acc - zero_acc)
    # cos_weights: mean over tensors of the cosine between reference and source tensors
    cw = np.mean([float(torch.nn.functional.cosine_similarity(ctx.reference.delta[k].reshape(1, -1),
                                                               folder[k].reshape(1, -1))) for k in folder])
    assert get_measure("cos_weights").fn(ctx, src).value == pytest.approx(cw, rel=1e-5)


def test_t5_identical_source_wins_every_measure(t5_pool, glue_dir, tmp_path):
    from mergekit_lab.similarity.run import run_similarity

    res = run_similarity(_settings(t5_pool, glue_dir, tmp_path / "sim", measure=list(PAPER_MEASURES)))
    weights = res["metrics"][TARGET]
    for m in PAPER_MEASURES:
        w = weights[m]
        assert sum(w.values()) == pytest.approx(1.0)
        assert w["same"] >= max(w.values()) - 1e-12, (m, w)
        if m != "performance":  # generation accuracy can saturate after the tune: a tie with far1 is allowed
            assert w["same"] > max(w["far1"], w["far2"]), (m, w)
    scores = json.loads((tmp_path / "sim" / "scores.json").read_text())["targets"][TARGET]["measures"]
    assert scores["kl"]["scores"]["same"] == pytest.approx(0.0, abs=1e-5)
    assert scores["cos_weights"]["scores"]["same"] == pytest.approx(1.0, abs=1e-5)


def test_t5_cli_flow_and_mixed_pool_errors(t5_pool, glue_dir, tiny_bert, tmp_path):
    """similarity -> weights/scores/bar -> merge -> train --peft-init on t2t; --all-targets heatmap;
    a pool mixing T5 and classifier modules, or a classification target for T5 modules: exit 2."""
    import shutil

    from mergekit_lab.cli.app import app

    runner = CliRunner()
    common = ["--data-dir", str(glue_dir), "--quiet", "--max-steps", "2", "--max-eval-samples", "16"]
    sim = tmp_path / "sim"
    r = runner.invoke(app, ["similarity", "--pool", str(t5_pool), "--target", TARGET, "--measure", "loss", "grand",
                            "--output-dir", str(sim), *common])
    assert r.exit_code == 0, r.output
    wf = json.loads((sim / "weights.json").read_text())
    assert wf["target"] == TARGET and wf["measure"] == "loss" and set(wf["weights"]) == {"far1", "far2", "same"}
    assert max(wf["weights"], key=wf["weights"].get) == "same"
    assert (sim / "weights_grand.json").is_file() and (sim / "bar.png").stat().st_size > 1000
    assert set(json.loads((sim / "scores.json").read_text())["targets"][TARGET]["measures"]) == {"loss", "grand"}
    assert json.loads((sim / "scores.json").read_text())["targets"][TARGET]["reference_seconds"] is None  # no tune
    members = sorted(str(p) for p in t5_pool.iterdir())
    init = tmp_path / "init"
    r = runner.invoke(app, ["merge", "--method", "average", "--models", *members, "--weights",
                            str(sim / "weights.json"), "--output-dir", str(init), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--peft-init", str(init), "--task", TARGET, "--k-shot", "4", "--max-steps", "2",
                            "--max-eval-samples", "8", "--data-dir", str(glue_dir), "--output-dir",
                            str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "accuracy" in json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["validation"]
    # leave-one-out over two text-to-text tasks: rows targets, columns sources, own module blank
    loo = tmp_path / "loo_pool"
    for name, task in (("same", TARGET), ("far1", "t2t/glue/cola"), ("far2", "t2t/glue/cola")):
        shutil.copytree(t5_pool / name, loo / name)
        meta = json.loads((loo / name / "mklab_module.json").read_text())
        (loo / name / "mklab_module.json").write_text(json.dumps({**meta, "task": task}))
    r = runner.invoke(app, ["similarity", "--pool", str(loo), "--all-targets", "--measure", "el2n",
                            "--output-dir", str(tmp_path / "m"), *common])
    assert r.exit_code == 0, r.output
    mat = json.loads((tmp_path / "m" / "weights.json").read_text())
    assert mat["matrix"]["t2t/glue/cola"] == {"same": 1.0} and set(mat["matrix"][TARGET]) == {"far1", "far2"}
    assert (tmp_path / "m" / "heatmap.png").stat().st_size > 1000
    # a T5 module beside an encoder-classifier module: exit 2 with a clear message
    from transformers import AutoModelForSequenceClassification

    from mergekit_lab.delta import DeltaSettings, save_module, wrap_model

    mixed = tmp_path / "mixed"
    shutil.copytree(t5_pool / "same", mixed / "t5")
    bert = wrap_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert), DeltaSettings(peft="lora"))
    save_module(bert, mixed / "bert", base_model=str(tiny_bert), task="glue/cola")
    for target in (TARGET, "glue/sst2"):
        r = runner.invoke(app, ["similarity", "--pool", str(mixed), "--target", target, "--output-dir",
                                str(tmp_path / "bad"), *common])
        assert r.exit_code == 2 and "mixed module families" in r.output, r.output
    # T5 modules scored on a classification target, classifier modules on a t2t target: exit 2
    r = runner.invoke(app, ["similarity", "--pool", str(t5_pool), "--target", "glue/sst2", "--output-dir",
                            str(tmp_path / "bad"), *common])
    assert r.exit_code == 2 and "t2t/glue/sst2" in r.output, r.output
    r = runner.invoke(app, ["similarity", "--pool", str(mixed / "bert"), "--target", TARGET, "--output-dir",
                            str(tmp_path / "bad"), *common])
    assert r.exit_code == 2 and "text-to-text task" in r.output, r.output


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_t5_prefix_and_adapter_pools_score(t5_pool, glue_dir, tmp_path, kind):
    """Every measure runs on T5 prefix / adapter pools: finite scores, KL >= 0, weights sum to 1."""
    from transformers import T5ForConditionalGeneration

    from mergekit_lab.delta import DeltaSettings, save_module, wrap_model
    from mergekit_lab.delta.modules import read_module
    from mergekit_lab.similarity.run import run_similarity

    backbone = read_module(t5_pool / "same").base_model
    settings = DeltaSettings(peft=kind, prefix_length=4, adapter_size=4)
    for i, name in enumerate(("a", "b")):
        m = wrap_model(T5ForConditionalGeneration.from_pretrained(backbone), settings, seed=i)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        save_module(m, tmp_path / "pool" / name, base_model=backbone, task=f"t2t/glue/src-{name}")
    s = _settings(tmp_path / "pool", glue_dir, tmp_path / "sim", measure=list(PAPER_MEASURES), num_examples=16)
    s.training.max_steps = 1
    res = run_similarity(s)
    scores = json.loads((tmp_path / "sim" / "scores.json").read_text())["targets"][TARGET]["measures"]
    for m in PAPER_MEASURES:
        assert all(math.isfinite(v) for v in scores[m]["scores"].values()), (m, scores[m])
        assert sum(res["metrics"][TARGET][m].values()) == pytest.approx(1.0)
    assert min(scores["kl"]["scores"].values()) >= 0 and min(scores["euclidean"]["scores"].values()) > 0
