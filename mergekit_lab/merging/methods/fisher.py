"""Fisher merging with diagonal Fisher information.

theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps), with F_i the diagonal Fisher of
model i (estimated by :func:`mergekit_lab.merging.statistics.compute_fisher` on the model's own
data; variants hard / soft / empirical), eps a smoothing constant and c_i the model weights,
optionally normalised per tensor (c_i ~ w_i / ||F_i|| for that tensor) or per model
(c_i ~ w_i / ||F_i|| over all parameters). Parameters without a Fisher estimate are averaged.
Reference: Matena & Raffel 2022, *Merging Models with Fisher-Weighted Averaging* (NeurIPS);
used as a baseline by Jin et al. 2023 (RegMean).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergekit_lab.errors import UserError
from mergekit_lab.merging.methods._common import average
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class FisherParams(MergeParams):
    variant: Literal["hard", "soft", "empirical"] = Field(
        "hard", description="how the Fisher statistics are estimated (chooses which stored statistics to use)"
    )
    normalization: Literal["none", "per_tensor", "per_model"] = "none"
    eps: float = Field(1e-10, ge=0, description="smoothing added to every Fisher entry")


@register_method("fisher")
class Fisher(MergeMethod):
    """Diagonal-Fisher weighted average (Matena & Raffel 2022)."""

    Params = FisherParams
    stats_kind = "fisher"

    def prepare(self, context: dict[str, Any]) -> None:
        self.global_norms = context.get("fisher_global_norms")

    def merge(self, job: TensorJob) -> torch.Tensor:
        if not job.stats or any(s is None for s in job.stats):
            job.notes.averaged_fallback.append(job.name)
            return average(job.tensors, job.weights)
        p = self.params
        w = job.normalized_weights()
        fs = [f.float() for f in job.stats]
        for f, t in zip(fs, job.tensors, strict=True):
            if f.shape != t.shape:
                raise UserError(f"Fisher statistics of {job.name} have shape {tuple(f.shape)}, parameter {tuple(t.shape)}")
        if p.normalization == "per_tensor":
            norms = [float(f.norm()) for f in fs]
            w = [wi / n if n > 0 else 0.0 for wi, n in zip(w, norms, strict=True)]
        elif p.normalization == "per_model":
            if not self.global_norms:
                raise RuntimeError("per_model normalisation needs fisher_global_norms in the merge context")
            w = [wi / self.global_norms[m] if self.global_norms[m] > 0 else 0.0 for wi, m in zip(w, job.models, strict=True)]
        num = torch.zeros_like(job.tensors[0], dtype=torch.float64)
        den = torch.zeros_like(num)
        for wi, f, t in zip(w, fs, job.tensors, strict=True):
            c = wi * (f.double() + p.eps)
            num += c * t.double()
            den += c
        job.notes.count("fisher_weighted")
        zero = den == 0
        if bool(zero.any()):  # no information anywhere (eps=0 and F=0): plain average there
            return torch.where(zero, average(job.tensors, job.weights).double(), num / den.masked_fill(zero, 1)).float()
        return (num / den).float()
