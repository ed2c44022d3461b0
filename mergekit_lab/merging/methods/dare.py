"""DARE: drop and rescale task vectors, then combine linearly or with TIES sign election.

delta_i = theta_i - theta_base; each entry is kept with probability 1 - p (seeded; the random
mask of a tensor depends only on the seed, the model index and the tensor name, so a streaming
merge is reproducible whatever the order) and rescaled by 1/(1 - p). ``combination=linear``:
theta = base + lambda * sum_i w_i delta_i'; ``ties``: sign election and disjoint mean over the
w_i delta_i' (no magnitude trimming; DARE replaces it).
Reference: Yu et al. 2024, *Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch* (ICML). Tensors missing from the base (task heads) are averaged.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from mergekit_lab.merging.methods._common import average, sign_elect_disjoint_mean, weighted_sum
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class DareParams(MergeParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    drop_rate: float = Field(0.9, ge=0, lt=1, description="probability p of dropping a delta entry [0, 1)")
    rescale: bool = True
    combination: Literal["linear", "ties"] = "linear"
    lam: float = Field(1.0, alias="lambda")
    seed: int = 0


def dare_mask(shape: torch.Size, drop_rate: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """The keep-mask of one model's tensor (True = kept), reproducible from (seed, model, name)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + model_index * 7919 + zlib.crc32(name.encode())) % (2**63))
    return torch.rand(shape, generator=g) >= drop_rate


@register_method("dare")
class Dare(MergeMethod):
    """DARE drop-and-rescale, linear or TIES combination (Yu et al. 2024)."""

    Params = DareParams
    needs_base = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        p = self.params
        if job.base is None:
            job.notes.averaged_fallback.append(job.name)
            return average(job.tensors, job.weights)
        deltas = []
        for t, m in zip(job.tensors, job.models, strict=True):
            d = t - job.base
            d = d * dare_mask(d.shape, p.drop_rate, p.seed, m, job.name)
            if p.rescale and p.drop_rate > 0:
                d = d / (1.0 - p.drop_rate)
            deltas.append(d)
        job.notes.count("task_vectors")
        if p.combination == "linear":
            return job.base + p.lam * weighted_sum(deltas, job.weights)
        weighted = [w * d for w, d in zip(job.weights, deltas, strict=True)]
        return job.base + p.lam * sign_elect_disjoint_mean(weighted)
