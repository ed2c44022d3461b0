"""End to end: `mklab train --sweep seed=1,2` on a tiny BERT, resume, dry run, then `mklab report`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergekit_lab.cli.app import app


def _train_args(tiny_bert: Path, glue_dir: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(glue_dir),
        "--max-train-samples", "16", "--max-eval-samples", "16", "--max-steps", "2", "--eval-steps", "2",
        "--per-device-train-batch-size", "8", "--learning-rate", "1e-3", "--quiet",
        "--output-dir", str(out),
    ]  # fmt: skip


def test_train_sweep_resume_and_report(tmp_path, tiny_bert, glue_dir):
    runner = CliRunner()
    out = tmp_path / "sweep"
    args = _train_args(tiny_bert, glue_dir, out) + ["--sweep", "seed=1,2"]

    res = runner.invoke(app, args + ["--dry-run"])
    assert res.exit_code == 0, res.output
    assert not out.exists()

    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    parent = json.loads((out / "results.json").read_text())
    assert parent["command"] == "sweep:train" and parent["schema_version"] == 1
    assert [c["name"] for c in parent["children"]] == ["seed=1", "seed=2"]
    accs = []
    for name in ("seed=1", "seed=2"):
        child = json.loads((out / name / "results.json").read_text())
        assert child["command"] == "train" and child["settings"]["run"]["seed"] == int(name[-1])
        accs.append(child["metrics"]["validation"]["accuracy"])
    (group,) = parent["aggregates"]
    stats = group["metrics"]["validation.accuracy"]
    mean = sum(accs) / 2
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(mean)
    assert stats["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs)))  # ddof=1, n=2
    (row,) = parent["rows"]
    assert row["metrics"]["accuracy"] == pytest.approx(mean) and row["n"] == 2

    # resume: finished children are skipped (their results are untouched)
    stamp = (out / "seed=1" / "results.json").stat().st_mtime_ns
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "seed=1" / "results.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in again["children"]] == ["skipped", "skipped"]

    res = runner.invoke(app, ["report", str(out), "--format", "csv", "--children"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "seed,glue/sst2 (accuracy)"
    assert lines[1:] == [f"1,{accs[0]!r}", f"2,{accs[1]!r}"]
    res = runner.invoke(app, ["report", str(out), "--format", "markdown", "--plot", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert f"{mean:.4f} ± " in res.stdout
    assert (tmp_path / "plots" / "bars.png").stat().st_size > 1000


def test_yaml_sweep_block_and_flags_merge(tmp_path, tiny_bert, glue_dir):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("sweep:\n  training.learning_rate: [1.0e-3, 1.0e-2]\n  seed: [5, 6, 7]\n")
    out = tmp_path / "sweep"
    args = _train_args(tiny_bert, glue_dir, out) + ["--config", str(cfg), "--sweep", "seed=1,2", "--dry-run"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # the flag's seed list replaces the YAML one; the YAML key order is kept
    for name in ("learning_rate=0.001,seed=1", "learning_rate=0.001,seed=2", "learning_rate=0.01,seed=2"):
        assert name in res.output
    assert "seed=5" not in res.output and not out.exists()
    bad = CliRunner().invoke(
        app, _train_args(tiny_bert, glue_dir, out) + ["--sweep", "learning_rate=1e-3,-1"]
    )
    assert bad.exit_code == 2 and "learning_rate=-1" in bad.output and not out.exists()
