"""TIES-merging: trim, elect sign, disjoint merge.

For task vectors tau_i = w_i (theta_i - theta_base): (1) keep the top ``density`` fraction of
each tau_i by magnitude (ours: per tensor, as mergekit does, so it streams; the paper trims over
the whole task vector), (2) elect a sign per entry as the sign of sum_i tau_i (``majority=total``,
the paper) or of the count of signs (``count``), (3) average the entries that agree with it;
theta = theta_base + lambda * tau_m. Entries at the trim threshold are all kept (ties).
Reference: Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models*
(NeurIPS). Tensors missing from the base (task heads) are averaged and reported.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field

from mergekit_lab.merging.methods._common import average, sign_elect_disjoint_mean
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class TiesParams(MergeParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    density: float = Field(0.2, gt=0, le=1, description="fraction of each task vector kept (0, 1]")
    lam: float = Field(1.0, alias="lambda", description="scaling of the merged task vector")
    majority: Literal["total", "count"] = "total"


def trim_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries of largest magnitude (a ``density`` fraction; ties at the threshold kept)."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = int(round(density * n))
    if k <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs().reshape(-1)
    thresh = torch.kthvalue(mag, n - k + 1).values
    keep = mag.reshape(delta.shape) >= thresh
    del mag
    return delta * keep


@register_method("ties")
class Ties(MergeMethod):
    """TIES-merging: trim to density, elect sign, disjoint mean (Yadav et al. 2023)."""

    Params = TiesParams
    needs_base = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        if job.base is None:
            job.notes.averaged_fallback.append(job.name)
            return average(job.tensors, job.weights)
        deltas = [trim_top(w * (t - job.base), self.params.density) for t, w in zip(job.tensors, job.weights, strict=True)]
        job.notes.count("task_vectors")
        return job.base + self.params.lam * sign_elect_disjoint_mean(deltas, self.params.majority)
