"""Task arithmetic.

theta = theta_base + lambda * sum_i w_i (theta_i - theta_base) (w_i = 1 by default).
Reference: Ilharco et al. 2023, *Editing Models with Task Arithmetic* (ICLR).
Tensors missing from the base model (task heads) are averaged and listed in the report.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field

from mergekit_lab.merging.methods._common import average, weighted_sum
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class TaskArithmeticParams(MergeParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float = Field(1.0, alias="lambda", description="scaling of the summed task vectors")


@register_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """base + lambda * sum of task vectors (Ilharco et al. 2023)."""

    Params = TaskArithmeticParams
    needs_base = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        if job.base is None:
            job.notes.averaged_fallback.append(job.name)
            return average(job.tensors, job.weights)
        deltas = [t - job.base for t in job.tensors]
        job.notes.count("task_vectors")
        return job.base + self.params.lam * weighted_sum(deltas, job.weights)
