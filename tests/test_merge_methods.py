"""Closed-form checks of the merge methods on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_lab.errors import UserError
from mergekit_lab.merging import list_methods, make_method, merge_models, method_help
from mergekit_lab.merging.methods import ties as ties_mod
from mergekit_lab.merging.methods.dare import dare_mask
from mergekit_lab.merging.methods.regmean import regmean_solve
from mergekit_lab.merging.methods.slerp import slerp
from mergekit_lab.merging.methods.ties import kth_largest, trim_top
from mergekit_lab.merging.registry import TensorJob


def _job(tensors, *, base=None, stats=None, layout=None, weights=None, name="layer.weight"):
    k = len(tensors)
    return TensorJob(name=name, tensors=tensors, weights=weights or [1.0] * k, models=list(range(k)),
                     base=base, stats=stats, layout=layout)


def test_registry_lists_every_method_with_params():
    assert set(list_methods()) >= {"average", "fisher", "regmean", "task_arithmetic", "ties", "dare", "slerp"}
    h = method_help()
    assert "regmean(alpha=1.0" in h and "lambda=1.0" in h and "needs --base-model" in h
    with pytest.raises(UserError, match="unknown merge method 'nope'"):
        make_method("nope")
    with pytest.raises(UserError, match="density"):
        make_method("ties", {"density": 0.0})
    with pytest.raises(UserError, match="density"):
        make_method("ties", {"density": 1.5})
    with pytest.raises(UserError, match="its parameters are"):
        make_method("average", {"alhpa": 1})
    assert make_method("task_arithmetic", {"lambda": 0.3}).params.lam == 0.3


def test_regmean_equals_least_squares_on_stacked_inputs():
    torch.manual_seed(0)
    d_in, d_out, k = 6, 4, 3
    xs = [torch.randn(50 + 10 * i, d_in, dtype=torch.float64) * (1 + i) for i in range(k)]
    ws = [torch.randn(d_out, d_in, dtype=torch.float64) for _ in range(k)]
    # closed form of min_W sum_i ||X_i W^T - X_i W_i^T||^2 / n_i  (Grams are normalised by n_i)
    xs_s = [x / math.sqrt(x.shape[0]) for x in xs]
    x_all = torch.cat(xs_s)
    y_all = torch.cat([x @ w.T for x, w in zip(xs_s, ws, strict=True)])
    lstsq = torch.linalg.lstsq(x_all, y_all).solution.T  # (d_out, d_in)
    grams = [x.T @ x / x.shape[0] for x in xs]
    m = make_method("regmean")
    out = m.merge(_job([w.float() for w in ws], stats=grams, layout="linear"))
    assert torch.allclose(out.double(), lstsq, atol=1e-5)
    # same through the Conv1D layout (weights stored transposed)
    out_c = m.merge(_job([w.T.float().contiguous() for w in ws], stats=grams, layout="conv1d"))
    assert torch.allclose(out_c.double(), lstsq.T, atol=1e-5)
    # linalg.solve path gives the same
    out_s = make_method("regmean", {"solver": "solve"}).merge(_job([w.float() for w in ws], stats=grams, layout="linear"))
    assert torch.allclose(out_s, out, atol=1e-6)


def test_regmean_identity_grams_give_average_and_alpha0_per_feature():
    torch.manual_seed(1)
    ws = [torch.randn(3, 5) for _ in range(2)]
    eye = [torch.eye(5, dtype=torch.float64)] * 2
    out = make_method("regmean").merge(_job(ws, stats=eye, layout="linear"))
    assert torch.allclose(out, (ws[0] + ws[1]) / 2, atol=1e-6)
    # alpha = 0: per input feature j, weights proportional to G_i[j, j]
    g = [torch.randn(5, 5, dtype=torch.float64) for _ in range(2)]
    g = [a @ a.T + torch.eye(5, dtype=torch.float64) for a in g]
    out0 = make_method("regmean", {"alpha": 0.0}).merge(_job(ws, stats=g, layout="linear"))
    d0, d1 = torch.diagonal(g[0]), torch.diagonal(g[1])
    expect = (ws[0].double() * d0 + ws[1].double() * d1) / (d0 + d1)  # columns = input features
    assert torch.allclose(out0.double(), expect, atol=1e-6)
    outd = make_method("regmean", {"diagonal_only": True}).merge(_job(ws, stats=g, layout="linear"))
    assert torch.allclose(outd, out0, atol=1e-6)
    # alpha strictly between: the diagonal is kept, off-diagonals shrunk
    gsh = [0.5 * a + 0.5 * torch.diag(torch.diagonal(a)) for a in g]
    out_half = make_method("regmean", {"alpha": 0.5}).merge(_job(ws, stats=g, layout="linear"))
    out_ref = make_method("regmean").merge(_job(ws, stats=gsh, layout="linear"))
    assert torch.allclose(out_half, out_ref, atol=1e-6)


def test_regmean_ridge_only_when_singular_and_reported():
    ws = [torch.randn(2, 3) for _ in range(2)]
    g = torch.zeros(3, 3, dtype=torch.float64)
    g[0, 0] = g[1, 1] = 1.0  # feature 2 never active: not positive definite
    job = _job(ws, stats=[g, g], layout="linear")
    out = make_method("regmean").merge(job)
    assert job.notes.ridge["layer.weight"] > 0
    # the inactive feature's column falls back to the average, active ones are exact
    assert torch.allclose(out, (ws[0] + ws[1]) / 2, atol=1e-5)
    wt, lam = regmean_solve([w.T for w in ws], [torch.eye(3, dtype=torch.float64)] * 2, [0.5, 0.5])
    assert lam == 0.0


def test_fisher_equal_is_average_and_weighting():
    ws = [torch.randn(4, 3) for _ in range(3)]
    f = torch.rand(4, 3) + 0.1
    m = make_method("fisher")
    assert torch.allclose(m.merge(_job(ws, stats=[f, f, f])), sum(ws) / 3, atol=1e-6)
    f0, f1 = torch.full((4, 3), 3.0), torch.full((4, 3), 1.0)
    out = m.merge(_job(ws[:2], stats=[f0, f1]))
    assert torch.allclose(out, 0.75 * ws[0] + 0.25 * ws[1], atol=1e-6)
    # per-tensor normalisation: scaling one model's Fisher does not matter any more
    mt = make_method("fisher", {"normalization": "per_tensor"})
    a = mt.merge(_job(ws[:2], stats=[f0 * 100, f1]))
    b = mt.merge(_job(ws[:2], stats=[f0, f1]))
    assert torch.allclose(a, b, atol=1e-6)
    mm = make_method("fisher", {"normalization": "per_model"})
    mm.prepare({"fisher_global_norms": [100.0, 1.0]})
    c = mm.merge(_job(ws[:2], stats=[f0 * 100, f1]))
    assert torch.allclose(c, 0.75 * ws[0] + 0.25 * ws[1], atol=1e-6)


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0])
    a, b = torch.tensor([2.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 4.0])
    out = make_method("task_arithmetic", {"lambda": 0.5}).merge(_job([a, b], base=base))
    assert torch.allclose(out, torch.tensor([1.5, 1.0, 3.5]))


def test_ties_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    b = torch.tensor([-1.0, -2.0, 0.2, -3.0, 1.0])
    c = torch.tensor([2.0, 1.0, -0.1, 1.0, 1.0])
    # density 0.4 keeps the 2 largest magnitudes of each task vector
    assert torch.equal(trim_top(a, 0.4), torch.tensor([3.0, 0, 0, 0, -4.0]))
    out = make_method("ties", {"density": 0.4}).merge(_job([a, b, c], base=base))
    # trimmed: a=[3,0,0,0,-4], b=[0,-2,0,-3,0], c=[2,1,0,0,0]
    # sums [5,-1,0,-3,-4] -> signs [+,-,0,-,-]; agreeing mean: [2.5, -2, 0, -3, -4]
    assert torch.allclose(out, torch.tensor([2.5, -2.0, 0.0, -3.0, -4.0]))
    out1 = make_method("ties", {"density": 1.0, "lambda": 2.0}).merge(_job([a, b], base=base + 1))
    # deltas a-1=[2,-2,-.5,1,-5], b-1=[-2,-3,-.8,-4,0]; sums [0,-5,-1.3,-3,-5]
    # elected [0,-,-,-,-]: [0, -2.5, -0.65, -4, -5] -> base + 2 * that
    assert torch.allclose(out1, torch.tensor([1.0, -4.0, -0.3, -7.0, -9.0]), atol=1e-6)


def test_kth_largest_is_exact_on_large_tensors_with_ties():
    g = torch.Generator().manual_seed(3)
    # above the 2**20 fast-path size; rounded values make many exact duplicates at any threshold
    mag = (torch.randn(1_500_000, generator=g).abs() * 100).round() / 100
    for k in (1, 7, 300_000, 750_000, 1_499_999, 1_500_000):
        assert kth_largest(mag, k) == torch.kthvalue(mag, mag.numel() - k + 1).values
    skewed = torch.cat([torch.zeros(1_400_000), torch.rand(200_000, generator=g)])  # heavy tie at 0
    for k in (100_000, 200_000, 300_000):
        assert kth_largest(skewed, k) == torch.kthvalue(skewed, skewed.numel() - k + 1).values


def test_ties_two_pass_chunked_equals_dense_reference_on_bf16(monkeypatch):
    """The streaming TIES (stored-dtype inputs, thresholds first, then chunks) equals the direct
    dense formula: trim each task vector, elect signs on the total mass, disjoint mean."""
    monkeypatch.setattr(ties_mod, "CHUNK", 1000)  # many chunks, one ragged
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 113, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.1 * torch.randn(37, 113, generator=g)).to(torch.bfloat16) for _ in range(3)]
    w, dens, lam = [1.0, 0.5, 2.0], 0.3, 0.7
    out = make_method("ties", {"density": dens, "lambda": lam}).merge(_job(models, base=base, weights=w))
    deltas = []
    for m, wi in zip(models, w):
        d = (m.float() - base.float()) * wi
        k = int(round(dens * d.numel()))
        thr = torch.kthvalue(d.abs().reshape(-1), d.numel() - k + 1).values
        deltas.append(d * (d.abs() >= thr))
    st = torch.stack(deltas)
    sign = st.sum(0).sign()
    agree = (st.sign() == sign) & (st != 0)
    ref = base.float() + lam * (st * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert all(m.dtype == torch.bfloat16 for m in models)
    f32 = [m.float() for m in models]
    copies, fb = [t.clone() for t in f32], base.float()
    make_method("ties", {"density": dens}).merge(_job(f32, base=fb, weights=w))
    assert all(torch.equal(a, b) for a, b in zip(f32 + [fb], copies + [base.float()]))  # float32 inputs are not modified in place


def test_dare_seeded_by_hand():
    base = torch.zeros(1000)
    a = torch.ones(1000)
    p = 0.3
    m = make_method("dare", {"drop_rate": p, "seed": 7})
    out = m.merge(_job([a], base=base, name="w"))
    mask = dare_mask(a.shape, p, 7, 0, "w")
    assert torch.allclose(out, mask.float() / (1 - p))
    assert torch.equal(out, m.merge(_job([a], base=base, name="w")))  # reproducible
    assert 0.6 < mask.float().mean() < 0.8
    # two models: linear sum of their rescaled masked deltas
    b = 2 * torch.ones(1000)
    out2 = m.merge(_job([a, b], base=base, name="w"))
    m1 = dare_mask(a.shape, p, 7, 1, "w")
    assert torch.allclose(out2, (mask.float() + 2 * m1.float()) / (1 - p))
    # no drop, no rescale == task arithmetic
    ta = make_method("task_arithmetic").merge(_job([a, b], base=base))
    assert torch.allclose(make_method("dare", {"drop_rate": 0.0}).merge(_job([a, b], base=base)), ta)
    # ties combination with opposite signs elects the larger mass
    out3 = make_method("dare", {"drop_rate": 0.0, "combination": "ties"}).merge(_job([a, -3 * a], base=base))
    assert torch.allclose(out3, -3 * a)


def test_slerp_endpoints_and_unit_norm():
    torch.manual_seed(0)
    v0, v1 = torch.randn(64), torch.randn(64)
    v0, v1 = v0 / v0.norm(), v1 / v1.norm()
    assert torch.allclose(slerp(0.0, v0, v1), v0, atol=1e-6)
    assert torch.allclose(slerp(1.0, v0, v1), v1, atol=1e-6)
    for t in (0.25, 0.5, 0.8):
        assert abs(float(slerp(t, v0, v1).norm()) - 1.0) < 1e-5
    # orthogonal unit vectors at t=0.5: (v0 + v1)/sqrt(2)
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.5, e0, e1), torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    # nearly colinear falls back to linear interpolation
    assert torch.allclose(slerp(0.5, e0, 2 * e0), 1.5 * e0)
    with pytest.raises(UserError, match="exactly 2"):
        merge_models([{"w": e0}, {"w": e0}, {"w": e1}], "slerp")


def test_in_memory_merge_and_weights():
    a = {"x.weight": torch.tensor([[1.0, 2.0]]), "pos": torch.tensor([0, 1])}
    b = {"x.weight": torch.tensor([[3.0, 6.0]]), "pos": torch.tensor([0, 1])}
    r = merge_models([a, b], "average", weights=[3, 1], output_dir=None)
    assert torch.allclose(r.state_dicts["merged"]["x.weight"], torch.tensor([[1.5, 3.0]]))
    assert torch.equal(r.state_dicts["merged"]["pos"], torch.tensor([0, 1]))
    with pytest.raises(UserError, match="at least 2"):
        merge_models([a], "average")
    with pytest.raises(UserError, match="needs the pretrained base model"):
        merge_models([a, b], "ties")
    with pytest.raises(UserError, match="2 weights given for 2|1 weights given for 2"):
        merge_models([a, b], "average", weights=[1])


def test_noniid_partitions_are_disjoint_and_skewed():
    from mergekit_lab.merging.task_variants import noniid_name, partition_indices

    labels = [i % 2 for i in range(200)]
    parts = [partition_indices(labels, i, 2, 50, 0.8, seed=3) for i in range(2)]
    assert not set(parts[0]) & set(parts[1])
    for i, p in enumerate(parts):
        assert len(p) == 50
        assert sum(labels[j] == i for j in p) == 40  # partition i: 80% label i
    assert parts[0] == partition_indices(labels, 0, 2, 50, 0.8, seed=3)  # seeded
    with pytest.raises(UserError, match="not enough examples"):
        partition_indices(labels, 0, 3, 90, 0.9, seed=0)
    assert noniid_name("glue/sst2", 1, 2, 50, 0.8, 3) == "noniid:glue/sst2:1of2:50:0.8:3"
