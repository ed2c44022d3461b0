"""Settings: precedence, templates, --set, key checks, CLI flag expansion."""

from __future__ import annotations

import pytest

from mergekit_lab.cli.common import expand_multi_values, parse_sweep_flags
from mergekit_lab.cli.train import TrainSettings
from mergekit_lab.errors import UserError
from mergekit_lab.settings import apply_templates, list_presets, load_settings, resolve_key


def write(path, text):
    path.write_text(text)
    return path


def test_precedence_defaults_preset_config_set_flags(tmp_path):
    preset = write(tmp_path / "p.yaml", "command: train\ntraining: {learning_rate: 1.0e-3, num_train_epochs: 5}\n"
                                        "run: {seed: 7}\n")
    c1 = write(tmp_path / "c1.yaml", "training: {learning_rate: 2.0e-3, weight_decay: 0.1}\n")
    c2 = write(tmp_path / "c2.yaml", "training: {weight_decay: 0.2}\nrun: {seed: 8}\n")
    s = load_settings(TrainSettings, command="train", preset=str(preset), configs=[c1, c2],
                      sets=["training.weight_decay=0.3", "seed=9"], flags={"seed": 10})
    assert s.training.num_train_epochs == 5          # preset over default
    assert s.training.learning_rate == 2e-3          # config over preset
    assert s.training.weight_decay == 0.3            # --set over config (deep-merged, c2 then set)
    assert s.run.seed == 10                          # flag over --set
    assert s.training.per_device_train_batch_size == 16  # default kept


def test_deep_merge_keeps_sibling_keys(tmp_path):
    c1 = write(tmp_path / "a.yaml", "data: {task: glue/sst2, max_seq_length: 64}\n")
    c2 = write(tmp_path / "b.yaml", "data: {max_train_samples: 10}\n")
    s = load_settings(TrainSettings, configs=[c1, c2])
    assert (s.data.task, s.data.max_seq_length, s.data.max_train_samples) == ("glue/sst2", 64, 10)


def test_templates_fill_placeholders_and_keep_types(tmp_path):
    c = write(tmp_path / "t.yaml", "run: {output_dir: 'runs/s{seed}-{task}', seed: '{seed}'}\n")
    s = load_settings(TrainSettings, configs=[c], templates=["seed=3", "task=rte"])
    assert str(s.run.output_dir) == "runs/s3-rte"
    assert s.run.seed == 3
    with pytest.raises(UserError, match=r"\{seed\}"):
        load_settings(TrainSettings, configs=[c])
    assert apply_templates({"a": ["x{n}"]}, {"n": 1}) == {"a": ["x1"]}


def test_unknown_key_names_key_and_file(tmp_path):
    c = write(tmp_path / "bad.yaml", "training: {learnig_rate: 0.1}\n")
    with pytest.raises(UserError) as e:
        load_settings(TrainSettings, configs=[c])
    assert "training.learnig_rate" in str(e.value) and "bad.yaml" in str(e.value)
    c2 = write(tmp_path / "bad2.yaml", "learning_rate: 0.1\n")
    with pytest.raises(UserError, match="training.learning_rate"):
        load_settings(TrainSettings, configs=[c2])


def test_wrong_type_and_negative_lr_fail(tmp_path):
    with pytest.raises(UserError, match="training.num_train_epochs"):
        load_settings(TrainSettings, sets=["training.num_train_epochs=many"])
    with pytest.raises(UserError, match=r"learning_rate.*--learning-rate.*greater than 0"):
        load_settings(TrainSettings, flags={"learning_rate": -1.0})
    with pytest.raises(UserError, match="precision"):
        load_settings(TrainSettings, sets=["precision=fp8"])


def test_malformed_yaml_is_one_clear_error(tmp_path):
    c = write(tmp_path / "broken.yaml", "training: {learning_rate: [1\n")
    with pytest.raises(UserError, match=r"malformed YAML in config file .*broken.yaml.* line"):
        load_settings(TrainSettings, configs=[c])


def test_resolve_key_bare_kebab_dotted():
    assert resolve_key(TrainSettings, "learning-rate") == "training.learning_rate"
    assert resolve_key(TrainSettings, "seed") == "run.seed"
    assert resolve_key(TrainSettings, "training.seed") == "training.seed"  # dotted kept as written
    with pytest.raises(UserError, match="unknown setting"):
        resolve_key(TrainSettings, "nope")


def test_multi_value_flags_expand():
    flags = {"--models", "--set"}
    assert expand_multi_values(["--models", "a", "b", "--x", "1", "--set", "k=v"], flags) == [
        "--models", "a", "--models", "b", "--x", "1", "--set", "k=v"]
    assert expand_multi_values(["--models", "0.5", "-0.5", "--y"], flags) == ["--models", "0.5", "--models", "-0.5", "--y"]
    assert parse_sweep_flags(["learning_rate=3e-1,0.4", "seed=1,2"]) == {"learning_rate": ["3e-1", 0.4], "seed": [1, 2]}


def test_presets_are_found_and_readable():
    presets = list_presets()
    assert "train-quickstart" in presets
    s = load_settings(TrainSettings, command="train", preset="train-quickstart")
    assert s.model.name_or_path == "builtin:minilm" and s.data.data_dir == "builtin:sample"
    with pytest.raises(UserError, match="unknown preset"):
        load_settings(TrainSettings, preset="no-such-preset")
