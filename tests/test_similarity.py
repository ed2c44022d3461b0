"""Similarity measures against direct computations, weights, granularity, ensembling (incl. exact
LoRA), figures, and the end-to-end property that a source identical to the target wins."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergekit_lab.errors import UserError
from mergekit_lab.similarity.measures import (
    cos_logits_labels,
    cos_weights,
    el2n,
    euclidean,
    get_measure,
    grad_norms,
    group_of,
    kl,
    list_measures,
)
from mergekit_lab.similarity.weights import make_weights_file, softmax_weights, tensor_weights

PAPER = {"loss": (-1, 0.1), "kl": (-1, 0.1), "el2n": (-1, 0.1), "cos_logits_labels": (1, 0.1), "grand": (-1, 0.1),
         "euclidean": (-1, 0.1), "performance": (1, 0.001), "cos_weights": (1, 0.001)}


def test_registry_signs_and_temperatures():
    for name, (sign, tau) in PAPER.items():
        m = get_measure(name)
        assert (m.sign, m.temperature) == (sign, tau), name
    assert {"uniform", "category"} <= set(list_measures())
    with pytest.raises(UserError, match="unknown similarity measure"):
        get_measure("nope")


def test_output_measures_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3))
    y = np.array([0, 2, 1, 1, 0])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(3)[y]
    t_logits, t_y = torch.tensor(logits), torch.tensor(y)
    np.testing.assert_allclose(el2n(t_logits, t_y, "single_label_classification").numpy(),
                               np.linalg.norm(p - onehot, axis=1), rtol=1e-6)
    np.testing.assert_allclose(cos_logits_labels(t_logits, t_y, "single_label_classification").numpy(),
                               p[np.arange(5), y] / np.linalg.norm(p, axis=1), rtol=1e-6)
    ref = rng.normal(size=(5, 3))
    q = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    np.testing.assert_allclose(kl(torch.tensor(ref), t_logits, "single_label_classification").numpy(),
                               (q * (np.log(q) - np.log(p))).sum(1), rtol=1e-5)
    assert float(kl(t_logits, t_logits, "single_label_classification").abs().max()) < 1e-6
    # multi-label with a label mask: only annotated labels count
    ml = rng.normal(size=(4, 5))
    my = (rng.random((4, 5)) > 0.5).astype(float)
    mask = np.ones((4, 5))
    mask[:, 3] = 0
    s = 1 / (1 + np.exp(-ml))
    np.testing.assert_allclose(el2n(torch.tensor(ml), torch.tensor(my), "multi_label_classification",
                                    torch.tensor(mask)).numpy(), np.linalg.norm((s - my) * mask, axis=1), rtol=1e-5)
    with pytest.raises(UserError, match="classification target"):
        cos_logits_labels(t_logits[:, :1], torch.zeros(5), "regression")


def test_grand_against_autograd(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from mergekit_lab.delta import DeltaSettings, delta_parameters, wrap_model

    m = wrap_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert), DeltaSettings(peft="lora", lora_r=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.randint(5, 60, (4, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    m.eval()
    params = delta_parameters(m)
    assert params and all("lora_" in k for k in params)
    loss = torch.nn.functional.cross_entropy(m(input_ids=ids).logits, labels)
    value, per = grad_norms(loss, params)
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(input_ids=ids).logits, labels).backward()
    direct = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))
    assert value == pytest.approx(direct, rel=1e-5)
    assert sum(per.values()) == pytest.approx(direct ** 2, rel=1e-5)


def test_parameter_measures_and_groups():
    k0 = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    k1 = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"
    a = {k0: torch.tensor([[3.0, 4.0]]), k1: torch.tensor([[1.0, 0.0]])}
    b = {k0: torch.tensor([[0.0, 0.0]]), k1: torch.tensor([[0.0, 1.0]])}
    e = euclidean(a, b)
    assert e.value == pytest.approx(5.0 + math.sqrt(2))
    assert e.groups["block"] == {"bert.encoder.layer.0": pytest.approx(5.0), "bert.encoder.layer.1": pytest.approx(2 ** 0.5)}
    c = cos_weights(a, {k0: torch.tensor([[6.0, 8.0]]), k1: torch.tensor([[0.0, 2.0]])})
    assert c.value == pytest.approx(0.5) and c.groups["block"]["bert.encoder.layer.1"] == pytest.approx(0.0)
    assert group_of(k0, "layer") == "bert.encoder.layer.0.attention.self.query"
    assert group_of("base_model.model.bert.encoder.layer.3.output.dense.adapter_up.bias", "layer") == \
        "bert.encoder.layer.3.output.dense"
    assert group_of("base_model.model.encoder.block.2.layer.0.SelfAttention.q.lora_B.weight", "block") == "encoder.block.2"
    assert group_of("prompt_embeddings", "block") is None and group_of(k0, "model") is None


def test_softmax_weights():
    s = {"a": 1.0, "b": 2.0, "c": 4.0}
    for sign in (1, -1):
        w = softmax_weights(s, sign, 0.5)
        assert sum(w.values()) == pytest.approx(1.0)
        z = sum(math.exp(sign * v / 0.5) for v in s.values())
        assert w["a"] == pytest.approx(math.exp(sign * 1.0 / 0.5) / z)
    assert softmax_weights(s, -1, 1e-6) == {"a": 1.0, "b": 0.0, "c": 0.0}  # tau -> 0: argmax of -s
    assert softmax_weights(s, 1, 1e-6)["c"] == 1.0
    assert all(v == pytest.approx(1 / 3, abs=1e-5) for v in softmax_weights(s, 1, 1e6).values())
    for bad in (0.0, -1.0):
        with pytest.raises(UserError, match="temperature"):
            softmax_weights(s, 1, bad)


# ---- module folders written directly (no model needed) ------------------------------------


def _lora_folder(path, tensors, r=2, alpha=4.0, peft_type="LORA", base="tiny", task=None):
    path.mkdir(parents=True)
    cfg = {"peft_type": peft_type, "r": r, "lora_alpha": alpha, "task_type": "SEQ_CLS",
           "base_model_name_or_path": base, "modules_to_save": ["classifier"], "target_modules": ["query"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "mklab_module.json").write_text(json.dumps({"kind": "lora", "base_model": base, "task": task}))
    return path


def _keys(layer):
    pre = f"base_model.model.bert.encoder.layer.{layer}.attention.self.query"
    return f"{pre}.lora_A.weight", f"{pre}.lora_B.weight"


def _random_pool(tmp_path, n=3, d_in=6, d_out=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(n):
        t = {}
        for layer in (0, 1):
            ka, kb = _keys(layer)
            t[ka] = torch.randn(r, d_in, generator=g)
            t[kb] = torch.randn(d_out, r, generator=g)
        t["base_model.model.classifier.weight"] = torch.randn(2 + i, d_in, generator=g)  # heads differ
        dirs.append(_lora_folder(tmp_path / f"s{i}", t, r=r, task=f"t{i}"))
    return dirs


def test_block_granularity_per_tensor(tmp_path):
    from mergekit_lab.delta import read_module
    from mergekit_lab.similarity.ensemble import ensemble_modules

    dirs = _random_pool(tmp_path)
    srcs = [{"name": d.name, "path": str(d.resolve()), "task": f"t{i}"} for i, d in enumerate(dirs[:2])]
    wf = make_weights_file(target="t2", measure="grand", sign=-1, temperature=0.1, granularity="block",
                           sources=srcs, weights={"s0": 0.5, "s1": 0.5},
                           groups={"bert.encoder.layer.0": {"s0": 0.9, "s1": 0.1},
                                   "bert.encoder.layer.1": {"s0": 0.2, "s1": 0.8}},
                           excluded=[{"name": "s2", "path": str(dirs[2].resolve()), "reason": "target"}])
    (tmp_path / "w.json").write_text(json.dumps(wf))
    assert tensor_weights(wf, _keys(1)[0]) == {"s0": 0.2, "s1": 0.8}
    rep = ensemble_modules(dirs, tmp_path / "out", weights_file=tmp_path / "w.json")
    assert rep["excluded"] == [str(dirs[2])]
    out = read_module(tmp_path / "out").tensors()
    src = [read_module(d).tensors() for d in dirs]
    for layer, (w0, w1) in ((0, (0.9, 0.1)), (1, (0.2, 0.8))):
        for k in _keys(layer):
            torch.testing.assert_close(out[k], w0 * src[0][k] + w1 * src[1][k])
    assert "base_model.model.classifier.weight" not in out  # heads are not ensembled
    layer_wf = dict(wf, granularity="layer", groups={"bert.encoder.layer.0.attention.self.query": {"s0": 1.0, "s1": 0.0}})
    assert tensor_weights(layer_wf, _keys(0)[1]) == {"s0": 1.0, "s1": 0.0}
    assert tensor_weights(layer_wf, _keys(1)[1]) == {"s0": 0.5, "s1": 0.5}  # no group: model level
    # a weights file that does not match the pool
    with pytest.raises(UserError, match="not among the merged modules"):
        ensemble_modules(dirs[1:], tmp_path / "bad", weights_file=tmp_path / "w.json")


def test_exact_lora_reproduces_weighted_delta(tmp_path):
    from mergekit_lab.delta import read_module
    from mergekit_lab.similarity.ensemble import ensemble_modules

    dirs = _random_pool(tmp_path, n=3, d_in=6, d_out=5, r=2)
    w = [0.5, 0.3, 0.2]
    scale = 4.0 / 2
    src = [read_module(d).tensors() for d in dirs]
    ensemble_modules(dirs, tmp_path / "exact", weights=w, lora_exact=True, rank=5)  # full rank: min(5, 6)
    mf = read_module(tmp_path / "exact")
    out, r_out = mf.tensors(), mf.config["r"]
    out_scale = mf.config["lora_alpha"] / r_out
    ka, kb = _keys(0)
    want = sum(wi * scale * s[kb] @ s[ka] for wi, s in zip(w, src))
    torch.testing.assert_close(out_scale * out[kb] @ out[ka], want, atol=1e-5, rtol=1e-5)
    # the plain average of A and B has cross terms: it does not give the weighted delta
    ensemble_modules(dirs, tmp_path / "avg", weights=w)
    avg = read_module(tmp_path / "avg").tensors()
    assert not torch.allclose(scale * avg[kb] @ avg[ka], want, atol=1e-3)
    torch.testing.assert_close(avg[ka], sum(wi * s[ka] for wi, s in zip(w, src)))


def test_pool_errors(tmp_path):
    from mergekit_lab.similarity.ensemble import ensemble_modules, is_module_pool

    dirs = _random_pool(tmp_path, n=2)
    other = _lora_folder(tmp_path / "ad", {"x": torch.zeros(1)}, peft_type="BOTTLENECK_ADAPTER")
    with pytest.raises(UserError, match="mixed module types"):
        ensemble_modules([dirs[0], other], tmp_path / "o1")
    t = read = None  # noqa: F841
    from mergekit_lab.delta import read_module

    read = read_module(dirs[0]).tensors()
    foreign = _lora_folder(tmp_path / "f", read, base="another-backbone")
    with pytest.raises(UserError, match="mixed backbones"):
        ensemble_modules([dirs[0], foreign], tmp_path / "o2")
    with pytest.raises(UserError, match="cannot mix"):
        is_module_pool([dirs[0], tmp_path])
    with pytest.raises(UserError, match="weights"):
        ensemble_modules(dirs, tmp_path / "o3", weights=[1.0])


def test_run_module_merge_entry(tmp_path):
    from mergekit_lab.delta import read_module
    from mergekit_lab.similarity.ensemble import run_module_merge

    dirs = _random_pool(tmp_path, n=2)
    (tmp_path / "w.json").write_text(json.dumps({"s0": 3.0, "s1": 1.0}))
    settings = SimpleNamespace(model=SimpleNamespace(models=[str(d) for d in dirs]),
                               merge=SimpleNamespace(method=["average"], method_params={}, weights=tmp_path / "w.json"))
    res = run_module_merge(settings, tmp_path / "m")
    ka = _keys(0)[0]
    s0, s1 = (read_module(d).tensors()[ka] for d in dirs)
    torch.testing.assert_close(read_module(tmp_path / "m").tensors()[ka], 0.75 * s0 + 0.25 * s1)
    assert res["metrics"]["ensemble"]["kind"] == "lora"
    settings.merge.method = ["ties"]
    with pytest.raises(UserError, match="--method average"):
        run_module_merge(settings, tmp_path / "m2")


def test_figures(tmp_path):
    from mergekit_lab.similarity.plots import bar_chart, heatmap

    p = heatmap({"t0": {"s1": 0.7, "s2": 0.3}, "t1": {"s0": 0.4, "s2": 0.6}}, ["s0", "s1", "s2"], tmp_path / "h.png")
    assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    b = bar_chart({"s0": 0.2, "s1": 0.8}, tmp_path / "b.png")
    assert b.stat().st_size > 1000
    from mergekit_lab.similarity.run import short_label

    assert short_label("file:/data/emotion-emoint") == "emotion-emoint" and short_label("glue/rte") == "glue/rte"


def test_baselines_uniform_and_category():
    from mergekit_lab.similarity.weights import category_weights, parse_categories, uniform_weights

    assert uniform_weights(["a", "b", "c", "d"]) == {k: 0.25 for k in "abcd"}
    cats = parse_categories(["sentiment=glue/sst2,emotion/isear", "pairs=glue/mrpc,glue/rte"])
    assert cats == {"glue/sst2": "sentiment", "emotion/isear": "sentiment", "glue/mrpc": "pairs", "glue/rte": "pairs"}
    # scores of the category measure: 1 inside the target's category, 0 outside
    assert category_weights({"sst2": 1.0, "isear": 1.0, "mrpc": 0.0}) == {"sst2": 0.5, "isear": 0.5, "mrpc": 0.0}
    with pytest.raises(UserError, match="category"):
        category_weights({"sst2": 0.0, "mrpc": 0.0})
    with pytest.raises(UserError, match="name=task1"):
        parse_categories(["sentiment"])
