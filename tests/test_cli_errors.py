"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left in the output location."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mergekit_lab.cli.app import app

runner = CliRunner()


def run(args):
    return runner.invoke(app, args, catch_exceptions=False)


def assert_clean_error(result, out_dir, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


def base(tiny_bert, glue_dir, out):
    return ["train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--max-steps", "1", "--quiet"]


def test_missing_model_folder(glue_dir, out, tmp_path):
    r = run(["train", "--model", str(tmp_path / "nope"), "--task", "glue/sst2", "--data-dir", str(glue_dir),
             "--output-dir", str(out)])
    assert_clean_error(r, out, "does not exist", "nope")


def test_unknown_task_lists_valid(tiny_bert, glue_dir, out):
    args = base(tiny_bert, glue_dir, out)
    args[args.index("glue/sst2")] = "glue/sst3"
    r = run(args)
    assert_clean_error(r, out, "unknown task 'glue/sst3'", "glue/sst2", "glue/cola")


def test_data_folder_without_files(tiny_bert, tmp_path, out):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(["train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(empty), "--output-dir", str(out)])
    assert_clean_error(r, out, "no SST-2 files", "SST-2/train.tsv")


def test_labels_outside_label_space(tiny_bert, tmp_path, out):
    d = tmp_path / "bad" / "SST-2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad movie\t7\n")
    (d / "dev.tsv").write_text("sentence\tlabel\ngood movie\t1\n")
    r = run(["train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(tmp_path / "bad"),
             "--output-dir", str(out)])
    assert_clean_error(r, out, "label 7", "outside the label space", "train.tsv")


def test_empty_split(tiny_bert, tmp_path, out):
    d = tmp_path / "e" / "SST-2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("sentence\tlabel\n")
    (d / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    r = run(["train", "--model", str(tiny_bert), "--task", "glue/sst2", "--data-dir", str(tmp_path / "e"),
             "--output-dir", str(out)])
    assert_clean_error(r, out, "split 'train'", "empty")


def test_malformed_yaml(tiny_bert, glue_dir, out, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training: {learning_rate: [\n")
    r = run([*base(tiny_bert, glue_dir, out), "--config", str(cfg)])
    assert_clean_error(r, out, "malformed YAML", "c.yaml")


def test_unknown_config_key_names_key_and_file(tiny_bert, glue_dir, out, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("training:\n  num_epochs: 3\n")
    r = run([*base(tiny_bert, glue_dir, out), "--config", str(cfg)])
    assert_clean_error(r, out, "training.num_epochs", "typo.yaml")


def test_negative_learning_rate(tiny_bert, glue_dir, out):
    r = run([*base(tiny_bert, glue_dir, out), "--learning-rate", "-1"])
    assert_clean_error(r, out, "training.learning_rate", "greater than 0")


def test_debug_shows_traceback(tiny_bert, glue_dir, out):
    args = base(tiny_bert, glue_dir, out)
    args[args.index("glue/sst2")] = "glue/nope"
    r = run([*args, "--debug"])
    assert r.exit_code == 2
    assert "Traceback" in r.stderr


def test_existing_output_needs_overwrite(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run(base(tiny_bert, glue_dir, out))
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_version_presets_and_print_config(tiny_bert, glue_dir, out):
    r = run(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mklab ")
    r = run(["presets"])
    assert r.exit_code == 0 and "train-quickstart" in r.stdout
    r = run(["presets", "train-quickstart"])
    assert "builtin:minilm" in r.stdout
    r = run([*base(tiny_bert, glue_dir, out), "--print-config", "--set", "training.weight_decay=0.01"])
    assert r.exit_code == 0
    import yaml

    cfg = yaml.safe_load(r.stdout)
    assert cfg["training"]["weight_decay"] == 0.01 and cfg["training"]["max_steps"] == 1
    assert not out.exists()
