"""Spherical linear interpolation of two models, tensor by tensor.

For flattened v0, v1 with angle Omega between v0/|v0| and v1/|v1|:
slerp = sin((1-t) Omega)/sin(Omega) v0 + sin(t Omega)/sin(Omega) v1; when the two are nearly
colinear (|cos Omega| > dot_threshold) or one is zero, linear interpolation is used instead.
t=0 gives the first model, t=1 the second; unit vectors stay unit vectors.
References: Shoemake 1985, *Animating rotation with quaternion curves* (SIGGRAPH); White 2016,
*Sampling Generative Networks*; as used by mergekit's ``slerp`` method.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergekit_lab.merging.registry import MergeMethod, MergeParams, TensorJob, register_method


class SlerpParams(MergeParams):
    t: float = Field(0.5, ge=0, le=1, description="interpolation factor (0 = first model)")
    dot_threshold: float = Field(0.9995, gt=0, le=1)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    a = v0.double().reshape(-1)
    b = v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    dot = torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0)
    if abs(float(dot)) > dot_threshold:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    s0 = torch.sin((1 - t) * omega) / so
    s1 = torch.sin(t * omega) / so
    return (s0 * v0.double() + s1 * v1.double()).float()


@register_method("slerp")
class Slerp(MergeMethod):
    """Spherical interpolation between exactly two models (Shoemake 1985; mergekit slerp)."""

    Params = SlerpParams
    min_models = 2
    max_models = 2

    def merge(self, job: TensorJob) -> torch.Tensor:
        if len(job.tensors) == 1:  # a head row subset annotated by one model only
            return job.tensors[0].clone()
        job.notes.count("slerp")
        return slerp(self.params.t, job.tensors[0], job.tensors[1], self.params.dot_threshold)
