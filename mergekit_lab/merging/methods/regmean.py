"""RegMean: regression mean of linear layers.

For a linear layer with per-model input Gram matrices G_i = X_i^T X_i / n_i (padding excluded),
the merged weight minimises sum_i c_i ||X_i W^T - X_i W_i^T||^2:

    W^T = (sum_i c_i G~_i)^-1  sum_i c_i G~_i W_i^T,   G~ = alpha G + (1 - alpha) diag(G)

solved with a Cholesky factorisation (``solver=cholesky``) or ``torch.linalg.solve`` (never an
explicit inverse), in float64. When sum_i c_i G~_i is not positive definite (e.g. an input
feature that is zero on every example), a small ridge lambda = ridge * mean(diag) is added,
pulling the solution towards the plain average: (A + lambda I) W^T = B + lambda W_avg^T; the
ridge used is reported per layer. ``diagonal_only`` uses only diag(G) (equivalent to alpha=0, a
per-input-feature weighted average) without forming matrices. GPT-2 Conv1D weights are stored
as W^T already. Every tensor without Gram statistics (biases, LayerNorm, embeddings) is
averaged. Reference: Jin, Ren, Preotiuc-Pietro, Cheng 2023, *Dataless Knowledge Fusion by
Merging Weights of Language Models* (ICLR).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergekit_lab.errors import UserError
from mergekit_lab.merging.methods._common import average
from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class RegMeanParams(MergeParams):
    alpha: float = Field(1.0, ge=0, le=1, description="non-diagonal shrink of the Grams (paper: 0.1 emotion/NER, 1.0 GLUE)")
    diagonal_only: bool = Field(False, description="use only diag(G): a per-feature weighted average")
    solver: str = Field("cholesky", pattern="^(cholesky|solve)$")
    ridge: float = Field(1e-6, gt=0, description="relative ridge used only when the Gram sum is not positive definite")


def regmean_solve(
    weights_t: list[torch.Tensor],
    grams: list[torch.Tensor],
    coefs: list[float],
    alpha: float = 1.0,
    solver: str = "cholesky",
    ridge: float = 1e-6,
) -> tuple[torch.Tensor, float]:
    """Solve the RegMean system for W^T (d_in x d_out). Returns (W^T float64, ridge used or 0)."""
    d = grams[0].shape[0]
    a = torch.zeros(d, d, dtype=torch.float64)
    b = torch.zeros(d, weights_t[0].shape[1], dtype=torch.float64)
    for c, g, wt in zip(coefs, grams, weights_t, strict=True):
        g = g.double()
        if alpha != 1.0:
            dg = torch.diagonal(g)
            g = alpha * g
            g.diagonal().copy_(dg)  # alpha*G off-diagonal, full diagonal
        a += c * g
        b += c * (g @ wt.double())
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        if solver == "cholesky":
            return torch.cholesky_solve(b, chol), 0.0
        return torch.linalg.solve(a, b), 0.0
    avg = sum(c * wt.double() for c, wt in zip(coefs, weights_t, strict=True)) / sum(coefs)
    scale = float(torch.diagonal(a).abs().mean())
    lam = ridge * (scale if scale > 0 else 1.0)
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0:
            return torch.cholesky_solve(b + lam * avg, chol), lam
        lam *= 10.0
    raise UserError("RegMean: the Gram sum stays singular even with a large ridge", hint="check the statistics for NaN/zeros")


@register_method("regmean")
class RegMean(MergeMethod):
    """Closed-form regression mean of linear layers from input Grams (Jin et al. 2023)."""

    Params = RegMeanParams
    stats_kind = "grams"

    def merge(self, job: TensorJob) -> torch.Tensor:
        if not job.stats or job.layout is None or any(s is None for s in job.stats):
            if job.stats is not None and job.layout is not None:
                job.notes.averaged_fallback.append(job.name)
            job.notes.count("averaged")
            return average(job.tensors, job.weights)
        p = self.params
        coefs = job.normalized_weights()
        wts = [t if job.layout == "conv1d" else t.t() for t in job.tensors]
        for g, wt in zip(job.stats, wts, strict=True):
            if g.shape != (wt.shape[0], wt.shape[0]):
                raise UserError(
                    f"Gram of {job.name} has shape {tuple(g.shape)}, but the layer has {wt.shape[0]} inputs",
                    hint="the statistics belong to another model; delete them to recompute",
                )
        job.notes.count("regmean")
        if p.diagonal_only or p.alpha == 0.0:
            diags = [torch.diagonal(g).double() for g in job.stats]
            den = sum(c * dg for c, dg in zip(coefs, diags, strict=True))
            num = sum(c * dg[:, None] * wt.double() for c, dg, wt in zip(coefs, diags, wts, strict=True))
            dead = den <= 0
            if bool(dead.any()):
                job.notes.ridge[job.name] = 0.0
                avg = sum(c * wt.double() for c, wt in zip(coefs, wts, strict=True))
                out = torch.where(dead[:, None], avg, num / den.masked_fill(dead, 1)[:, None])
            else:
                out = num / den[:, None]
        else:
            out, lam = regmean_solve(wts, job.stats, coefs, p.alpha, p.solver, p.ridge)
            if lam:
                job.notes.ridge[job.name] = lam
        out = out.float()
        return out if job.layout == "conv1d" else out.t().contiguous()
