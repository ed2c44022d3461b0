"""Distillation losses (DistilBERT / DIITO).

* ``ce``: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocabulary and averaged over
  the selected tokens (real tokens, or only MLM-masked ones with ``restrict_ce_to_mask``).
* ``mlm`` / ``clm``: the student's own language-model loss.
* ``mse``: squared error of the logits summed over the vocabulary, averaged over selected tokens.
* ``cos``: 1 - cos(student, teacher) of the last block's outputs, averaged over real tokens
  (``nn.CosineEmbeddingLoss`` with target 1).
* ``causal_ce`` / ``causal_cos``: ``ce`` / ``cos`` on the counterfactual (intervened) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows at ``mask``; 2-D inputs are already gathered (logits computed at the mask only)."""
    return x if x.ndim == 2 else x[mask.bool()]


def kl_ce(s_logits, t_logits, mask, temperature: float) -> torch.Tensor:
    s = _select(s_logits, mask).float()
    t = _select(t_logits, mask).float()
    if s.shape[0] == 0:
        return s_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="sum")
    return kl / s.shape[0] * temperature**2


def mse(s_logits, t_logits, mask) -> torch.Tensor:
    s = _select(s_logits, mask).float()
    t = _select(t_logits, mask).float()
    if s.shape[0] == 0:
        return s_logits.sum() * 0.0
    return F.mse_loss(s, t, reduction="sum") / s.shape[0]


def cosine(s_hidden, t_hidden, mask) -> torch.Tensor:
    s = _select(s_hidden, mask).float()
    t = _select(t_hidden, mask).float()
    if s.shape[0] == 0:
        return s_hidden.sum() * 0.0
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def mlm(s_logits, labels) -> torch.Tensor:
    if (labels != -100).sum() == 0:
        return s_logits.sum() * 0.0
    if s_logits.ndim == 2:  # gathered at the masked positions
        return F.cross_entropy(s_logits.float(), labels[labels != -100])
    return F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def clm(s_logits, labels) -> torch.Tensor:
    logits = s_logits[:, :-1].float()
    target = labels[:, 1:]
    if (target != -100).sum() == 0:
        return s_logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


@dataclass
class LossWeights:
    ce: float = 0.0
    mlm: float = 0.0
    clm: float = 0.0
    mse: float = 0.0
    cos: float = 0.0
    causal_ce: float = 0.0
    causal_cos: float = 0.0

    @property
    def causal(self) -> bool:
        return self.causal_ce > 0 or self.causal_cos > 0

    def as_dict(self) -> dict[str, float]:
        return {n: float(getattr(self, n)) for n in LOSS_NAMES}


def distillation_losses(
    student_out,
    teacher_out,
    *,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    weights: LossWeights,
    temperature: float = 2.0,
    restrict_ce_to_mask: bool = False,
    compute_all: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and each term (detached), from ``DoubledOutput`` of student and teacher.

    Terms with weight 0 are skipped unless ``compute_all`` (then they are reported but not added).
    """
    ce_mask = (labels != -100) if restrict_ce_to_mask else attention_mask.bool()
    terms: dict[str, torch.Tensor] = {}
    w = weights.as_dict()

    def want(name):
        return w[name] > 0 or compute_all

    if want("ce"):
        terms["ce"] = kl_ce(student_out.logits, teacher_out.logits, ce_mask, temperature)
    if w["mlm"] > 0 or (compute_all and w["clm"] == 0):
        terms["mlm"] = mlm(student_out.logits, labels)
    if w["clm"] > 0:
        terms["clm"] = clm(student_out.logits, labels)
    if want("mse"):
        terms["mse"] = mse(student_out.logits, teacher_out.logits, ce_mask)
    if want("cos"):
        terms["cos"] = cosine(student_out.last_hidden, teacher_out.last_hidden, attention_mask)
    if student_out.cf_logits is not None and teacher_out.cf_logits is not None:
        if want("causal_ce"):
            terms["causal_ce"] = kl_ce(student_out.cf_logits, teacher_out.cf_logits, ce_mask, temperature)
        if want("causal_cos"):
            terms["causal_cos"] = cosine(student_out.cf_last_hidden, teacher_out.cf_last_hidden, attention_mask)
    total = sum(w[n] * v for n, v in terms.items() if w[n] > 0)
    if not isinstance(total, torch.Tensor):
        total = student_out.logits.sum() * 0.0
    return total, {n: v.detach() for n, v in terms.items()}
