"""`mklab merge` end to end on a tiny BERT and tiny GLUE-format data (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergekit_lab.cli.app import _quiet_libraries, app
from mergekit_lab.results import load_results

runner = CliRunner()
TRAIN = ["--max-steps", "6", "--learning-rate", "2e-3", "--per-device-train-batch-size", "16", "--seed", "0"]


def _invoke(args: list[str]):
    _quiet_libraries()
    return runner.invoke(app, ["merge", *args, "--quiet"])


def test_merge_cli_zoo_aliases_heads_keep_with_baselines(tiny_bert, glue_dir, tmp_path):
    args = [
        "--models", "sst2", "cola",
        "--model-specs", "{sst2: {task: glue/sst2}, cola: {task: glue/cola}}",
        "--base-model", str(tiny_bert), "--data-dir", str(glue_dir),
        "--method", "average", "fisher", "regmean", "--method-params", "{regmean: {alpha: 0.9}}",
        "--heads", "keep", "--baselines", "individual", "ensemble", "multitask",
        "--stats-examples", "32", "--zoo-dir", str(tmp_path / "zoo"), *TRAIN,
    ]
    r = _invoke([*args, "--output-dir", str(tmp_path / "m1")])
    assert r.exit_code == 0, r.output
    res = load_results(tmp_path / "m1")
    rows = res["rows"]
    kinds = {(x["kind"], x["task"]) for x in rows}
    for k in ("individual", "ensemble", "merged"):
        assert (k, "glue/sst2") in kinds and (k, "glue/cola") in kinds, k
    assert not any(x["kind"] == "multitask" for x in rows)  # different label spaces: skipped with a note
    methods = {x.get("method") for x in rows if x["kind"] == "merged"}
    assert methods == {"average", "fisher", "regmean"}
    for x in rows:
        assert x["split"] == "validation" and x["domain"] == "in"
        assert all(isinstance(v, float) for v in x["metrics"].values())
    # one loadable folder per task with its own head
    kept = tmp_path / "m1" / "merged" / "sst2+cola" / "regmean"
    assert (kept / "sst2" / "config.json").exists() and (kept / "cola" / "config.json").exists()
    report = next(x for x in res["merge_reports"] if x["method"] == "regmean")
    assert report["params"]["alpha"] == 0.9 and report["notes"]["counts"]["regmean"] > 0
    assert res["summary"]["regmean[sst2+cola]"]["mean_in_domain"] is not None
    stats = Path(res["statistics"]["sst2"]["regmean"])
    mtime = stats.stat().st_mtime_ns
    # second run: zoo models and statistics are reused
    r2 = _invoke([*args, "--output-dir", str(tmp_path / "m2"), "--method", "regmean"])
    assert r2.exit_code == 0, r2.output
    assert stats.stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "zoo").glob("glue-*"))) == 2


def test_merge_cli_partitions_pairwise_greedy_weights_and_errors(tiny_bert, glue_dir, tmp_path):
    common = [
        "--model-specs", "{p0: {task: glue/sst2, partition: 0}, p1: {task: glue/sst2, partition: 1}, "
        "p2: {task: glue/sst2, partition: 2}}",
        "--partitions", "3", "--partition-size", "24", "--partition-share", "0.8",
        "--base-model", str(tiny_bert), "--data-dir", str(glue_dir), "--zoo-dir", str(tmp_path / "zoo"), *TRAIN,
    ]
    r = _invoke(["--models", "p0", "p1", "p2", "--method", "ties", "average", "--strategy", "pairwise",
                 "--baselines", "ensemble", *common, "--output-dir", str(tmp_path / "pw")])
    assert r.exit_code == 0, r.output
    rows = load_results(tmp_path / "pw")["rows"]
    merged = {x["model"] for x in rows if x["kind"] == "merged"}
    assert merged == {f"{m}[{a}+{b}]" for m in ("ties", "average") for a, b in (("p0", "p1"), ("p0", "p2"), ("p1", "p2"))}
    assert sum(x["kind"] == "ensemble" for x in rows) == 3

    wfile = tmp_path / "w.json"
    wfile.write_text(json.dumps({"weights": {"p0": 1.0, "p1": 3.0, "p2": 0.5}}))
    r = _invoke(["--models", "p0", "p1", "p2", "--filter-model", "p0", "p1", "--method", "average",
                 "--strategy", "greedy", "--weights", str(wfile), *common, "--output-dir", str(tmp_path / "gr")])
    assert r.exit_code == 0, r.output
    res = load_results(tmp_path / "gr")
    assert [x["step"] for x in res["rows"]] == [2]
    assert res["merge_reports"][0]["weights"] == [1.0, 3.0]

    # errors: one line, exit code 2
    bad = _invoke(["--models", "p0", "--method", "average", *common, "--output-dir", str(tmp_path / "e1")])
    assert bad.exit_code == 2 and "at least 2 models" in bad.output
    bad = _invoke(["--models", "p0", "p1", "--method", "nope", *common, "--output-dir", str(tmp_path / "e2")])
    assert bad.exit_code == 2 and "unknown merge method" in bad.output
    bad = _invoke(["--models", "p0", "p1", "--method", "ties", "--method-params", "{density: 2}", *common,
                   "--output-dir", str(tmp_path / "e3")])
    assert bad.exit_code == 2 and "density" in bad.output


@pytest.mark.parametrize("heads", ["merge"])
def test_merge_cli_head_mismatch_suggests_keep(tiny_bert, glue_dir, tmp_path, heads):
    from tests.factories import make_tiny_bert

    three = make_tiny_bert(tmp_path / "three", num_labels=3)
    r = _invoke(["--models", str(tiny_bert), str(three), "--model-tasks", "glue/sst2", "glue/sst2",
                 "--method", "average", "--heads", heads, "--data-dir", str(glue_dir),
                 "--output-dir", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--heads keep" in r.output


def test_model_spec_training_overrides_reach_the_zoo(monkeypatch, tmp_path):
    """Per-alias max_train_samples / num_train_epochs override the shared training settings
    for that model only (the quickstart trains CoLA longer than SST-2)."""
    import mergekit_lab.models.zoo as zoo
    from mergekit_lab.cli.merge import MergeSettings
    from mergekit_lab.merging.experiment import resolve_models
    from mergekit_lab.settings import load_settings

    seen = {}

    def fake_get_or_train(ts, zoo_dir, retrain=False):
        seen[ts.data.task] = (ts.data.max_train_samples, ts.training.num_train_epochs, zoo.zoo_key(ts))
        return tmp_path, True

    monkeypatch.setattr(zoo, "get_or_train", fake_get_or_train)
    s = load_settings(MergeSettings, sets=[
        "model.models=[a, b]", "model.base_model=builtin:minilm",
        "model.model_specs={a: {task: glue/sst2}, b: {task: glue/cola, max_train_samples: 2000, num_train_epochs: 3}}",
        "data.max_train_samples=1000", "training.num_train_epochs=2",
    ])
    resolve_models(s)
    assert seen["glue/sst2"][:2] == (1000, 2.0)
    assert seen["glue/cola"][:2] == (2000, 3.0)
    assert s.training.num_train_epochs == 2.0  # the shared settings are not modified
