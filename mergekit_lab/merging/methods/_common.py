"""Shared tensor helpers for merge methods."""

from __future__ import annotations

import torch


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for w, t in zip(weights, tensors, strict=True):
        out.add_(t.float(), alpha=float(w))
    return out


def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    s = float(sum(weights))
    return weighted_sum(tensors, [w / s for w in weights])


def sign_elect_disjoint_mean(deltas: list[torch.Tensor], majority: str = "total") -> torch.Tensor:
    """TIES steps 2-3: elect a sign per entry (sign of the summed mass, or of the count of
    positive vs negative entries), then average only the non-zero entries agreeing with it."""
    stacked = torch.stack([d.float() for d in deltas])
    if majority == "total":
        sign = torch.sign(stacked.sum(0))
    else:
        sign = torch.sign(torch.sign(stacked).sum(0))
    agree = (torch.sign(stacked) == sign.unsqueeze(0)) & (stacked != 0)
    num = (stacked * agree).sum(0)
    cnt = agree.sum(0)
    return torch.where(cnt > 0, num / cnt.clamp(min=1), torch.zeros_like(num))
