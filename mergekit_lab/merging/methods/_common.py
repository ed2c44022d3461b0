"""Shared tensor helpers for merge methods."""

from __future__ import annotations

import torch


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i t_i in float32; inputs may be in any floating dtype (bf16/fp16 are promoted
    element-wise by the in-place add, exactly, without a float32 copy of each input)."""
    # the first term initialises the (fresh, float32) output: no zero-filled buffer, one pass less
    out = tensors[0].to(torch.float32, copy=True).mul_(float(weights[0]))
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t, alpha=float(w))
    return out


def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    s = float(sum(weights))
    return weighted_sum(tensors, [w / s for w in weights])


def sign_elect_disjoint_mean(deltas: list[torch.Tensor], majority: str = "total") -> torch.Tensor:
    """TIES steps 2-3: elect a sign per entry (sign of the summed mass, or of the count of
    positive vs negative entries), then average only the non-zero entries agreeing with it.
    Computed model by model (no stacked copy), so memory stays at a few tensors."""
    sign = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d in deltas:
        sign.add_(d.float() if majority == "total" else torch.sign(d.float()))
    sign.sign_()
    num = torch.zeros_like(sign)
    cnt = torch.zeros_like(sign)
    for d in deltas:
        agree = torch.sign(d.float()).eq_(sign).logical_and_(d != 0)
        num.add_(d.float() * agree)
        cnt.add_(agree)
    del sign
    return num.div_(cnt.clamp_(min=1))
