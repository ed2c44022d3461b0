"""Weighted parameter averaging.

theta = sum_i c_i theta_i with c_i = w_i / sum_j w_j (1/K by default). References: Wortsman et
al. 2022, *Model soups* (uniform soup); the "simple average" baseline of Jin et al. 2023,
*Dataless Knowledge Fusion by Merging Weights of Language Models* (ICLR).
"""

from __future__ import annotations

import torch

from mergekit_lab.merging.methods._common import average, weighted_sum
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class AverageParams(MergeParams):
    normalize: bool = True
    """Divide by the sum of the weights (False: a plain weighted sum)."""


@register_method("average")
class Average(MergeMethod):
    """(Weighted) mean of the parameters (model soup; Jin et al. 2023 simple average)."""

    Params = AverageParams
    raw_inputs = True  # weighted_sum promotes bf16/fp16 inputs in place, no float32 copies

    def merge(self, job: TensorJob) -> torch.Tensor:
        job.notes.count("averaged")
        if self.params.normalize:
            return average(job.tensors, job.weights)
        return weighted_sum(job.tensors, job.weights)
