"""Delta modules: save/load round trips (LoRA, prefix, adapter), the adapter's placement and
identity start, the train seam (--peft, --peft-init, zoo key) and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_lab.delta import (
    AdapterLinear,
    DeltaSettings,
    attach_module,
    delta_parameters,
    module_state_dict,
    read_module,
    save_module,
    wrap_model,
)
from mergekit_lab.errors import UserError


def _model(folder, num_labels=2):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _perturb(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("settings", [
    DeltaSettings(peft="lora", lora_r=4, lora_alpha=8),
    DeltaSettings(peft="prefix", prefix_length=4),
    DeltaSettings(peft="prefix", prefix_length=4, prefix_projection=True, prefix_hidden_size=8),
    DeltaSettings(peft="adapter", adapter_size=6, adapter_non_linearity="gelu"),
], ids=["lora", "prefix", "prefix-projection", "adapter"])
def test_round_trip(tiny_bert, tmp_path, settings):
    base_logits = _model(tiny_bert)(**_batch()).logits
    m = wrap_model(_model(tiny_bert), settings, seed=3)
    _perturb(m)  # a trained-looking module, head included
    m.eval()
    want = m(**_batch()).logits
    assert not torch.allclose(want, base_logits, atol=1e-4)
    save_module(m, tmp_path / "mod", base_model=str(tiny_bert), task="glue/sst2")
    mf = read_module(tmp_path / "mod")
    assert mf.kind == settings.peft and mf.task == "glue/sst2" and mf.base_model == str(tiny_bert)
    assert (tmp_path / "mod" / "adapter_config.json").is_file()
    assert mf.delta_keys() and len(mf.delta_keys()) < len(mf.shapes())  # the head is saved separately
    back = attach_module(_model(tiny_bert), tmp_path / "mod")
    torch.testing.assert_close(back(**_batch()).logits, want, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in back.parameters())
    # trainable reload (what --peft-init does) gives the same function and trainable delta params
    again = attach_module(_model(tiny_bert), tmp_path / "mod", trainable=True).eval()
    torch.testing.assert_close(again(**_batch()).logits, want, atol=1e-5, rtol=1e-5)
    assert delta_parameters(again)


def test_lora_folder_is_stock_peft(tiny_bert, tmp_path):
    from peft import PeftModel

    m = wrap_model(_model(tiny_bert), DeltaSettings(peft="lora", lora_r=2), seed=0)
    _perturb(m)
    m.eval()
    save_module(m, tmp_path / "lora")
    stock = PeftModel.from_pretrained(_model(tiny_bert), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(stock(**_batch()).logits, m(**_batch()).logits)


def test_adapter_positions_identity_and_trainable(tiny_bert):
    base = _model(tiny_bert)
    want = base(**_batch()).logits
    m = wrap_model(_model(tiny_bert), DeltaSettings(peft="adapter", adapter_size=5), seed=0).eval()
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, AdapterLinear)]
    # after attention and after the feed-forward sub-layer of each of the 2 layers
    assert sorted(wrapped) == sorted(f"bert.encoder.layer.{i}.{s}" for i in range(2)
                                     for s in ("attention.output.dense", "output.dense"))
    torch.testing.assert_close(m(**_batch()).logits, want)  # up-projection starts at zero
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".adapter_" in n or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    ad = m.get_submodule("bert.encoder.layer.0.output.dense")
    h = torch.randn(2, 64)  # the feed-forward output projection reads the intermediate size
    with torch.no_grad():
        ad.adapter_up.weight.normal_()
        expect = ad.base_layer(h) + ad.adapter_up(torch.relu(ad.adapter_down(ad.base_layer(h))))
    torch.testing.assert_close(ad(h), expect)


def test_head_if_fits_and_errors(tiny_bert, tmp_path):
    m = wrap_model(_model(tiny_bert), DeltaSettings(peft="lora", lora_r=2), seed=0)
    _perturb(m)
    save_module(m, tmp_path / "two")
    three = _model(tiny_bert, num_labels=3)
    fresh_head = three.classifier.weight.detach().clone()
    loaded = attach_module(three, tmp_path / "two", load_head="if_fits")
    torch.testing.assert_close(loaded.base_model.model.classifier.modules_to_save["default"].weight, fresh_head)
    with pytest.raises(UserError):
        attach_module(_model(tiny_bert, num_labels=3), tmp_path / "two", load_head=True)
    with pytest.raises(UserError, match="not a module folder"):
        read_module(tiny_bert)
    with pytest.raises(UserError, match="does not exist"):
        read_module(tmp_path / "nope")


def _train_settings(tiny_bert, glue_dir, out, **delta):
    from mergekit_lab.cli.train import TrainSettings

    return TrainSettings.model_validate({
        "run": {"output_dir": str(out), "quiet": True},
        "model": {"name_or_path": str(tiny_bert) if "peft_init" not in delta else None},
        "data": {"task": "glue/sst2", "data_dir": str(glue_dir), "max_train_samples": 32, "max_eval_samples": 16},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "per_device_train_batch_size": 8},
        "delta": delta})


def test_train_seam_peft_and_peft_init(tiny_bert, glue_dir, tmp_path):
    from mergekit_lab.cli.train import train_model
    from mergekit_lab.models.zoo import zoo_key

    s = _train_settings(tiny_bert, glue_dir, tmp_path / "a", peft="adapter", adapter_size=4)
    train_model(s)
    out = tmp_path / "a"
    assert {"adapter_config.json", "adapter_model.safetensors", "mklab_module.json", "results.json"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # the module, not the full model
    meta = json.loads((out / "mklab_module.json").read_text())
    assert meta["kind"] == "adapter" and meta["task"] == "glue/sst2" and meta["num_labels"] == 2
    # --peft-init without --model: the backbone comes from the folder; the module continues from it
    s2 = _train_settings(tiny_bert, glue_dir, tmp_path / "b", peft_init=str(out))
    res = train_model(s2)
    assert res["settings"].model.name_or_path == str(tiny_bert)
    assert read_module(tmp_path / "b").kind == "adapter"
    with pytest.raises(UserError, match="holds a adapter module"):
        train_model(_train_settings(tiny_bert, glue_dir, tmp_path / "c", peft="lora", peft_init=str(out)))
    # the zoo key covers the delta settings
    k0 = zoo_key(_train_settings(tiny_bert, glue_dir, tmp_path / "x"))
    k1 = zoo_key(_train_settings(tiny_bert, glue_dir, tmp_path / "x", peft="lora"))
    k2 = zoo_key(_train_settings(tiny_bert, glue_dir, tmp_path / "x", peft="lora", lora_r=4))
    assert len({k0, k1, k2}) == 3


def test_module_state_dict_names_match_folder(tiny_bert, tmp_path):
    m = wrap_model(_model(tiny_bert), DeltaSettings(peft="lora", lora_r=2), seed=0)
    save_module(m, tmp_path / "l")
    mf = read_module(tmp_path / "l")
    assert set(module_state_dict(m)) == set(mf.shapes())
    assert set(delta_parameters(m)) == set(mf.delta_keys())


@pytest.mark.parametrize("kind", ["lora", "prefix", "adapter"])
def test_t5_text_to_text_modules_train_and_round_trip(glue_dir, tmp_path, kind):
    """`train --peft KIND` on a tiny T5 with a t2t/ task writes a SEQ_2_SEQ_LM module folder that
    reloads onto a fresh backbone with the same decoder outputs (T5 reads ``wo.weight``, so the
    adapter must expose its base layer's weight)."""
    from transformers import T5ForConditionalGeneration

    from mergekit_lab.cli.train import TrainSettings, train_model
    from tests.test_tasks_factories import make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5")
    out = tmp_path / kind
    extra = {"prefix": {"prefix_length": 4}, "adapter": {"adapter_size": 6}}.get(kind, {"lora_r": 4})
    train_model(TrainSettings.model_validate({
        "run": {"output_dir": str(out), "quiet": True}, "model": {"name_or_path": str(t5)},
        "data": {"task": "t2t/glue/sst2", "data_dir": str(glue_dir), "max_eval_samples": 8},
        "training": {"max_steps": 3, "learning_rate": 3e-2, "per_device_train_batch_size": 8},
        "delta": {"peft": kind, **extra}}))
    mf = read_module(out)
    assert mf.kind == kind and mf.config["task_type"] == "SEQ_2_SEQ_LM" and mf.task == "t2t/glue/sst2"
    if kind == "adapter":
        assert any(".DenseReluDense.wo.adapter_up" in k for k in mf.tensors())
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([[10, 1], [11, 1]])}
    base = T5ForConditionalGeneration.from_pretrained(t5).eval()
    with torch.no_grad():
        plain = base(**batch).logits
        a = attach_module(T5ForConditionalGeneration.from_pretrained(t5), out)(**batch).logits
        b = attach_module(T5ForConditionalGeneration.from_pretrained(t5), out)(**batch).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain, atol=1e-5)  # the trained module changes the outputs
