"""The similarity measures (Lv et al. 2023), each registered with its sign and default temperature.

Every measure scores one source module against the target task; weights are
``softmax(sign * s / tau)`` (:mod:`mergekit_lab.similarity.weights`). ``sign`` is a property of
the measure: -1 where lower means more similar (losses, distances, gradient norms), +1 where
higher means more similar (cosines, performance). The original code negated every score,
which weights the least similar sources most under the cosine measures.

Per-example quantities are averaged over the target examples (the paper sums over the tokens of
one batch; a mean keeps the temperature meaningful whatever the number of examples). For a
classifier an example has one "token".

Text-to-text (T5) targets (``t2t/...`` tasks, modules trained with ``task_type SEQ_2_SEQ_LM``):
the output space is the vocabulary, shared by every source, so no head is needed and no
reference tune is run unless a measure needs one. Each example is teacher-forced on its target
string (the label word, e.g. ``positive</s>``) and the measures read the decoder's full-vocabulary
distribution p_t at every target token t (labels != -100; the end-of-sequence token included),
as in the paper, which sums over tokens (:func:`seq2seq_token_stats`):

- ``loss``: the seq2seq cross-entropy, a mean over all target tokens of the scored examples
  (what T5's own loss gives on one batch holding them all);
- ``kl``: per example sum_t KL(p_target,t || p_j,t), p_target from the reference module (a fresh
  module of the pool's configuration tuned briefly on the target); mean over examples;
- ``el2n``: per example sum_t ||p_j,t - onehot(y_t)||_2; mean over examples;
- ``cos_logits_labels``: per example sum_t cos(p_j,t, onehot(y_t)) = sum_t p_j,t(y_t) / ||p_j,t||_2;
  mean over examples;
- ``grand``: the gradient norm of the module parameters of the seq2seq loss, per batch, averaged;
- ``euclidean``, ``performance``, ``cos_weights``: as for classifiers, through the shared training
  loop; ``performance`` scores by greedy generation (the task's own evaluation).

The full-vocabulary choice (rather than a distribution renormalised over the label words) follows
the paper and works for any target string, including multi-token label words and the yes/no
questions of multi-label tasks.

The pure functions (:func:`el2n`, :func:`cos_logits_labels`, :func:`kl`, :func:`grad_norms`,
:func:`euclidean`, :func:`cos_weights`) take tensors and are tested against direct computations;
the registered measures wire them to a :class:`~mergekit_lab.similarity.scoring.TargetContext`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergekit_lab.errors import UserError


@dataclass
class Score:
    """A source's score: one value, and per block / per layer values for parameter-based measures."""

    value: float
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # granularity -> group -> value


@dataclass(frozen=True)
class Measure:
    name: str
    sign: int
    temperature: float
    description: str
    fn: Callable | None = None
    needs_reference: bool = False  # the short tune on the target from random init
    needs_tune: bool = False  # a short tune of each source on the target
    grouped: bool = False  # gives per-block / per-layer scores
    baseline: bool = False  # weights without scoring (uniform, category)


_MEASURES: dict[str, Measure] = {}
#: the paper's eight measures (the baselines uniform and category are registered too)
PAPER_MEASURES = ("loss", "kl", "el2n", "cos_logits_labels", "grand", "euclidean", "performance", "cos_weights")


def register_measure(name: str, *, sign: int, temperature: float, description: str, needs_reference: bool = False,
                     needs_tune: bool = False, grouped: bool = False, baseline: bool = False):
    """Decorator: ``fn(ctx, source) -> Score`` becomes the measure ``name``."""
    if sign not in (-1, 1):
        raise ValueError("sign must be -1 or +1")

    def deco(fn):
        _MEASURES[name] = Measure(name, sign, temperature, description, fn, needs_reference, needs_tune, grouped,
                                  baseline)
        return fn

    return deco


def get_measure(name: str) -> Measure:
    if name not in _MEASURES:
        raise UserError(f"unknown similarity measure {name!r}", hint=f"choose one of: {', '.join(list_measures())}")
    return _MEASURES[name]


def list_measures() -> list[str]:
    return list(_MEASURES)


# --------------------------------------------------------------------------------------------
# pure functions


def probabilities(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    logits = logits.float()
    if problem_type == "single_label_classification":
        return logits.softmax(-1)
    if problem_type == "multi_label_classification":
        return logits.sigmoid()
    return logits.reshape(-1)


def _targets(labels: torch.Tensor, problem_type: str, num_labels: int) -> torch.Tensor:
    if problem_type == "single_label_classification":
        return F.one_hot(labels.long(), num_labels).float()
    return labels.float().reshape(labels.shape[0], -1) if problem_type == "multi_label_classification" \
        else labels.float().reshape(-1)


def el2n(logits: torch.Tensor, labels: torch.Tensor, problem_type: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example error L2 norm ||p - onehot(y)||_2 (multi-label: masked; regression: |pred - y|)."""
    p = probabilities(logits, problem_type)
    y = _targets(labels, problem_type, logits.shape[-1])
    if problem_type == "regression":
        return (p - y).abs()
    d = p - y
    if mask is not None:
        d = d * mask.float()
    return d.norm(dim=-1)


def cos_logits_labels(logits: torch.Tensor, labels: torch.Tensor, problem_type: str,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example cos(p, onehot(y)) (multi-label: over the annotated labels; 0 for an empty vector)."""
    if problem_type == "regression":
        raise UserError("cos_logits_labels needs a classification target, not a regression task",
                        hint="use loss, el2n, kl or grand for regression targets")
    p = probabilities(logits, problem_type)
    y = _targets(labels, problem_type, logits.shape[-1])
    if mask is not None:
        p, y = p * mask.float(), y * mask.float()
    num = (p * y).sum(-1)
    den = p.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def kl(ref_logits: torch.Tensor, logits: torch.Tensor, problem_type: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example KL(p_target || p_source) (multi-label: sum of Bernoulli KLs; regression: Gaussian)."""
    if problem_type == "single_label_classification":
        lt, ls = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum(-1)
    if problem_type == "multi_label_classification":
        pt, ps = ref_logits.float().sigmoid(), logits.float().sigmoid()
        eps = 1e-7
        pt, ps = pt.clamp(eps, 1 - eps), ps.clamp(eps, 1 - eps)
        per = pt * (pt.log() - ps.log()) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())
        if mask is not None:
            per = per * mask.float()
        return per.sum(-1)
    return 0.5 * (ref_logits.float().reshape(-1) - logits.float().reshape(-1)) ** 2


def seq2seq_token_stats(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None = None,
                        ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Per-example sums over the target tokens (``labels != ignore_index``) of a decoder's outputs.

    ``logits`` (batch, T, vocab) are teacher-forced on ``labels`` (batch, T). Returns per example:
    ``tokens`` (count), ``ce`` (sum of -log p_t(y_t)), ``el2n`` (sum of ||p_t - onehot(y_t)||_2),
    ``cos`` (sum of cos(p_t, onehot(y_t))) and, with ``ref_logits``, ``kl`` (sum of
    KL(p_ref,t || p_t)); p_t is the full-vocabulary softmax at target position t.
    """
    mask = (labels != ignore_index).float()
    logp = logits.float().log_softmax(-1)
    gold = logp.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    p_gold = gold.exp()
    sq = logp.exp().pow(2).sum(-1)
    out = {"tokens": mask.sum(-1), "ce": (-gold * mask).sum(-1),
           "el2n": ((sq - 2 * p_gold + 1).clamp_min(0).sqrt() * mask).sum(-1),
           "cos": (p_gold / sq.sqrt() * mask).sum(-1)}
    if ref_logits is not None:
        lq = ref_logits.float().log_softmax(-1)
        out["kl"] = ((lq.exp() * (lq - logp)).sum(-1) * mask).sum(-1)
    return out


_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|block|h)\.\d+)\.")
_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|adapter_down|adapter_up|lora_magnitude_vector)"
                     r"(\.[A-Za-z_]+)?$")


def group_of(key: str, granularity: str) -> str | None:
    """The block (``bert.encoder.layer.3``) or layer (``...layer.3.attention.self.query``) of a tensor name.

    None for ``model`` granularity and for tensors outside any block (e.g. a prefix's embedding),
    which then use the model-level weights.
    """
    if granularity == "model":
        return None
    name = key
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if granularity == "block":
        m = _BLOCK.search(name + ".")
        return m.group(1) if m else None
    if granularity == "layer":
        if not _BLOCK.search(name + "."):
            return None
        stripped = _SUFFIX.sub("", name)
        if stripped == name:
            stripped = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        return stripped
    raise UserError(f"unknown granularity {granularity!r}", hint="choose model, block or layer")


def _grouped(values: dict[str, float], reduce: str) -> dict[str, dict[str, float]]:
    """Combine per-tensor values into per-block and per-layer values (sum of squares -> sqrt, sum or mean)."""
    out: dict[str, dict[str, float]] = {}
    for gran in ("block", "layer"):
        acc: dict[str, list[float]] = {}
        for k, v in values.items():
            g = group_of(k, gran)
            if g is not None:
                acc.setdefault(g, []).append(v)
        if reduce == "norm":
            out[gran] = {g: float(sum(vs) ** 0.5) for g, vs in acc.items()}
        elif reduce == "sum":
            out[gran] = {g: float(sum(vs)) for g, vs in acc.items()}
        else:
            out[gran] = {g: float(sum(vs) / len(vs)) for g, vs in acc.items()}
    return out


def grad_norms(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> tuple[float, dict[str, float]]:
    """||grad of loss w.r.t. the delta parameters||_2 and the squared norm per tensor."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    sq = {n: float(g.float().pow(2).sum()) if g is not None else 0.0 for n, g in zip(names, grads)}
    return sum(sq.values()) ** 0.5, sq


def euclidean(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Score:
    """sum_k ||theta^k - theta'^k||_F over the delta tensors (per block / layer: the sum within the group)."""
    per = {k: float((after[k].float() - before[k].float()).norm()) for k in before}
    return Score(sum(per.values()), _grouped(per, "sum"))


def cos_weights(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> Score:
    """mean_k cos(theta_target^k, theta_source^k) over the delta tensors (per group: the mean within it)."""
    per = {}
    for k, t in target.items():
        a, b = t.float().reshape(-1), source[k].float().reshape(-1)
        den = a.norm() * b.norm()
        per[k] = float((a @ b) / den) if den > 0 else 0.0
    return Score(sum(per.values()) / max(len(per), 1), _grouped(per, "mean"))


# --------------------------------------------------------------------------------------------
# registered measures (ctx: scoring.TargetContext, src: delta.ModuleFolder)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


@register_measure("loss", sign=-1, temperature=0.1, description="mean task loss on target examples")
def _loss(ctx, src) -> Score:
    if ctx.seq2seq:
        st = ctx.seq_outputs(src)
        return Score(float(st["ce"].sum() / st["tokens"].sum().clamp_min(1)))
    out = ctx.outputs(src)
    return Score(float(ctx.task.loss(out.logits, out.labels, out.mask)))


@register_measure("kl", sign=-1, temperature=0.1, needs_reference=True,
                  description="mean KL(p_target || p_source), p_target from a short tune on the target")
def _kl(ctx, src) -> Score:
    if ctx.seq2seq:
        return Score(_mean(ctx.seq_outputs(src, kl=True)["kl"]))
    out = ctx.outputs(src)
    return Score(_mean(kl(ctx.reference.logits, out.logits, ctx.task.problem_type, out.mask)))


@register_measure("el2n", sign=-1, temperature=0.1, description="mean error L2 norm ||p - onehot(y)||")
def _el2n(ctx, src) -> Score:
    if ctx.seq2seq:
        return Score(_mean(ctx.seq_outputs(src)["el2n"]))
    out = ctx.outputs(src)
    return Score(_mean(el2n(out.logits, out.labels, ctx.task.problem_type, out.mask)))


@register_measure("cos_logits_labels", sign=1, temperature=0.1, description="mean cos(p, onehot(y))")
def _cos(ctx, src) -> Score:
    if ctx.seq2seq:
        return Score(_mean(ctx.seq_outputs(src)["cos"]))
    out = ctx.outputs(src)
    return Score(_mean(cos_logits_labels(out.logits, out.labels, ctx.task.problem_type, out.mask)))


@register_measure("grand", sign=-1, temperature=0.1, grouped=True,
                  description="mean over batches of ||grad of the delta parameters||_2 (train mode, no step)")
def _grand(ctx, src) -> Score:
    return ctx.grand(src)


@register_measure("euclidean", sign=-1, temperature=0.1, needs_tune=True, grouped=True,
                  description="sum_k ||theta^k - theta^k after a short tune on the target||_F")
def _euclidean(ctx, src) -> Score:
    tuned = ctx.tuned(src)
    return euclidean(tuned.before, tuned.after)


@register_measure("performance", sign=1, temperature=0.001, needs_tune=True,
                  description="dev score after a short tune minus the zero-shot dev score")
def _performance(ctx, src) -> Score:
    tuned = ctx.tuned(src)
    return Score(tuned.dev_score - ctx.zero_shot_score())


@register_measure("cos_weights", sign=1, temperature=0.001, needs_reference=True, grouped=True,
                  description="mean_k cos(theta_target_tuned^k, theta_source^k)")
def _cos_weights(ctx, src) -> Score:
    return cos_weights(ctx.reference.delta, ctx.source_delta(src))


@register_measure("uniform", sign=1, temperature=1.0, baseline=True, description="baseline: equal weights")
def _uniform(ctx, src) -> Score:
    return Score(0.0)


@register_measure("category", sign=1, temperature=1.0, baseline=True,
                  description="baseline: equal weights within the target's category (--categories)")
def _category(ctx, src) -> Score:
    return Score(1.0 if ctx.same_category(src) else 0.0)
