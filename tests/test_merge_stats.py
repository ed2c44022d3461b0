"""RegMean Gram and Fisher statistics: padding, closed forms, storage and reuse."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from mergekit_lab.errors import UserError
from mergekit_lab.merging import (
    StatisticsFile,
    compute_fisher,
    compute_grams,
    ensure_statistics,
    load_statistics,
    save_statistics,
)


def tiny_bert(num_labels=2):
    torch.manual_seed(0)
    c = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(c).eval()


def test_padding_does_not_change_grams():
    m = tiny_bert()
    a = torch.tensor([[5, 6, 7, 8, 9]])
    b = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [10, 11, 12, 13, 14, 15, 16, 17]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]),
    }
    separate = [{"input_ids": a, "attention_mask": torch.ones_like(a)},
                {"input_ids": b, "attention_mask": torch.ones_like(b)}]
    g_pad, i_pad = compute_grams(m, [padded], progress=False)
    g_sep, i_sep = compute_grams(m, separate, progress=False)
    q = "bert.encoder.layer.0.attention.self.query"
    assert i_pad["n_tokens"][q] == 13 == i_sep["n_tokens"][q]
    assert i_pad["n_tokens"]["classifier"] == 2  # pooled input: one row per example
    for k in g_sep:
        assert torch.allclose(g_pad[k], g_sep[k], atol=1e-5, rtol=1e-4), k
    g_inc, _ = compute_grams(m, [padded], exclude_padding=False, progress=False)
    assert not torch.allclose(g_inc[q], g_sep[q], atol=1e-3)  # the test can see padding


def test_gram_is_normalised_xtx_of_layer_inputs():
    lin = nn.Sequential(nn.Linear(3, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lin

        def forward(self, x, attention_mask=None):
            return self.net(x)

    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g, info = compute_grams(Wrap(), [{"x": x, "attention_mask": mask}], progress=False)
    rows = x[mask.bool()].double()
    assert torch.allclose(g["net.0"], rows.T @ rows / 5)
    assert info["layouts"]["net.0"] == "linear" and g["net.0"].dtype == torch.float64
    g32, _ = compute_grams(Wrap(), [{"x": x, "attention_mask": mask}], dtype=torch.float32, progress=False)
    assert g32["net.0"].dtype == torch.float32


class LinearClassifier(nn.Module):
    def __init__(self, d=3, c=4, problem_type=None):
        super().__init__()
        self.lin = nn.Linear(d, c, bias=False)
        self.config = SimpleNamespace(problem_type=problem_type)

    def forward(self, x):
        return SimpleNamespace(logits=self.lin(x))


def test_fisher_hard_soft_empirical_closed_form():
    torch.manual_seed(0)
    m = LinearClassifier()
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 3, 0])
    data = [{"x": x[i : i + 1], "labels": y[i : i + 1]} for i in range(5)]
    p = torch.softmax(m.lin(x), -1).detach()
    for variant in ("hard", "soft", "empirical"):
        f, info = compute_fisher(m, data, variant=variant, progress=False)
        expect = torch.zeros(4, 3)
        for i in range(5):
            if variant == "hard":
                t = torch.nn.functional.one_hot(p[i].argmax(), 4).float()
                grad_logits = p[i] - t
            elif variant == "empirical":
                grad_logits = p[i] - torch.nn.functional.one_hot(y[i], 4).float()
            else:  # sum_c p_c (grad log p_c)^2, grad_z log p_c = e_c - p
                for c in range(4):
                    e = torch.nn.functional.one_hot(torch.tensor(c), 4).float()
                    expect += p[i, c] * torch.outer(e - p[i], x[i]) ** 2
                continue
            expect += torch.outer(grad_logits, x[i]) ** 2
        assert torch.allclose(f["lin.weight"], expect / 5, atol=1e-6), variant
        assert info["n_examples"] == 5 and info["n_batches"] == 5


def test_fisher_multilabel_masked_rows_are_zero():
    torch.manual_seed(0)
    m = LinearClassifier(problem_type="multi_label_classification")
    x = torch.randn(6, 3)
    labels = torch.randint(0, 2, (6, 4)).float()
    mask = torch.tensor([[1, 1, 0, 1]] * 6)

    def loss_fn(logits, targets, label_mask):
        per = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (per * label_mask).sum() / label_mask.sum()

    batches = [{"x": x[:3], "labels": labels[:3], "label_mask": mask[:3]}, {"x": x[3:], "labels": labels[3:], "label_mask": mask[3:]}]
    for variant in ("hard", "soft", "empirical"):
        f, _ = compute_fisher(m, batches, variant=variant, loss_fn=loss_fn, progress=False)
        w = f["lin.weight"]
        assert torch.all(w[2] == 0) and torch.all(w[[0, 1, 3]].sum(1) > 0), variant
    # max_examples truncates the last batch
    _, info = compute_fisher(m, batches, variant="hard", loss_fn=loss_fn, max_examples=4, progress=False)
    assert info["n_examples"] == 4 and info["n_batches"] == 2
    with pytest.raises(UserError, match="variant"):
        compute_fisher(m, batches, variant="fancy")


def test_statistics_round_trip_and_reuse(tmp_path):
    m = tiny_bert()
    batch = {"input_ids": torch.randint(3, 50, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    g, info = compute_grams(m, [batch], progress=False)
    path = save_statistics(tmp_path / "g.safetensors", g, {"kind": "grams", **info})
    back, meta = load_statistics(path)
    assert set(back) == set(g) and all(torch.equal(back[k], g[k]) for k in g)
    assert meta["kind"] == "grams" and meta["n_examples"] == 3 and meta["version"] == 1
    assert StatisticsFile(path).layout("classifier") == "linear"

    calls = []

    def compute():
        calls.append(1)
        return compute_grams(m, [batch], progress=False)

    req = {"kind": "grams", "n_examples": 3, "padding": "excluded", "data": {"task": "x", "seed": 1}}
    p1, reused = ensure_statistics(tmp_path / "s" / "grams.safetensors", req, compute)
    assert not reused and len(calls) == 1
    _, reused = ensure_statistics(p1, req, compute)
    assert reused and len(calls) == 1
    _, reused = ensure_statistics(p1, {**req, "data": {"task": "x", "seed": 2}}, compute)
    assert not reused and len(calls) == 2
    assert StatisticsFile(p1).metadata["data"]["seed"] == 2
