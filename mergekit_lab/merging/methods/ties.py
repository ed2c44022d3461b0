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


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D tensor ``mag`` (1 <= k <= numel), exactly.

    ``torch.kthvalue`` over a whole 65M-entry embedding takes seconds; for large tensors a seeded
    sample brackets the answer between two sample quantiles, the entries above the bracket are
    counted, and ``kthvalue`` runs only on the entries inside it. If the bracket misses (it is
    six standard errors wide, so practically never) the full ``kthvalue`` is used: the result is
    the same either way.
    """
    n = mag.numel()
    if n <= 1 << 20:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator().manual_seed(0)
    sample = mag[torch.randint(n, (1 << 16,), generator=g)].float()
    q = 1.0 - k / n
    lo, hi = torch.quantile(sample, torch.tensor([max(0.0, q - 0.01), min(1.0, q + 0.01)])).tolist()
    above = int((mag > hi).sum())
    if above < k:
        band = mag[(mag >= lo) & (mag <= hi)]
        if above + band.numel() >= k:
            return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def trim_threshold(mag: torch.Tensor, density: float) -> float | None:
    """The magnitude an entry needs to survive trimming to ``density`` (ties at the threshold
    kept): None keeps everything (density 1), inf keeps nothing (rounds to zero entries)."""
    if density >= 1.0:
        return None
    k = int(round(density * mag.numel()))
    if k <= 0:
        return float("inf")
    return float(kth_largest(mag.reshape(-1), k))


def apply_trim(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return delta if threshold is None else delta * (delta.abs() >= threshold)


def trim_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries of largest magnitude (a ``density`` fraction; ties at the threshold kept)."""
    return apply_trim(delta, trim_threshold(delta.abs(), density))


#: entries per chunk in the second pass (16 MB of float32 per temporary)
CHUNK = 1 << 22


@register_method("ties")
class Ties(MergeMethod):
    """TIES-merging: trim to density, elect sign, disjoint mean (Yadav et al. 2023)."""

    Params = TiesParams
    needs_base = True
    raw_inputs = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        """Two passes, so memory stays at the stored inputs plus one float32 tensor: (1) per
        model, the trim threshold of |w_i (theta_i - base)|; (2) chunk by chunk, recompute the
        task vectors, trim them, elect signs and take the disjoint mean."""
        if job.base is None:
            job.notes.averaged_fallback.append(job.name)
            return average(job.tensors, job.weights)
        p = self.params
        shape = job.tensors[0].shape
        flat = [t.reshape(-1) for t in job.tensors]
        base = job.base.reshape(-1)
        n = base.numel()
        # |w (t - base)| is a new tensor (inputs stay untouched), built only when trimming
        thresholds = [None if p.density >= 1.0 else trim_threshold((t.float() - base).mul_(w).abs_(), p.density)
                      for t, w in zip(flat, job.weights, strict=True)]
        out = torch.empty(n, dtype=torch.float32)
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            b = base[s:e].float()  # may alias the input: never modified in place
            deltas = []
            for t, w, thr in zip(flat, job.weights, thresholds, strict=True):
                deltas.append(apply_trim((t[s:e].float() - b).mul_(w), thr))
            out[s:e] = torch.add(b, sign_elect_disjoint_mean(deltas, p.majority), alpha=p.lam)
        job.notes.count("task_vectors")
        return out.reshape(shape)
