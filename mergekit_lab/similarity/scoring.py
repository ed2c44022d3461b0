"""Scoring source modules against a target task.

A :class:`TargetContext` holds what every measure needs for one target: the backbone with a
head for the target's label space, the target's dev examples (the whole dev set by default,
capped) and, when a measure needs them, its training examples for the short tunes (run by the
shared :func:`~mergekit_lab.training.fit` loop, ``max_steps`` steps, default 200).

Heads (**ours**, for encoder classifiers; the paper's T5 modules share the vocabulary as output
space): sources were trained on other label spaces, so each source module is plugged into the
backbone with one shared target head, by default the head of the *reference* module, a module of
the pool's configuration tuned briefly on the target from random init (the same tune that gives
``kl`` its p_target and ``cos_weights`` its theta_target). ``head="source"`` uses each source's
own head instead (label spaces must match). ``performance``'s zero-shot score is the backbone
with that head and no module: a per-target constant, so it shifts the scores without changing
the weights.

Text-to-text targets (``t2t/`` tasks on T5 modules) need no head: the output space is the
vocabulary. The reference module is then tuned only when a measure needs it (``kl``,
``cos_weights``), and the output-based measures read per-example sums over the target tokens
(:func:`~mergekit_lab.similarity.measures.seq2seq_token_stats`, definitions in
:mod:`~mergekit_lab.similarity.measures`). ``kl`` runs the reference module beside each source
on the same batches instead of caching full-vocabulary distributions.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lab.delta.modules import (
    ModuleFolder,
    apply_folder_config,
    attach_module,
    delta_parameters,
    is_head_key,
    module_state_dict,
)
from mergekit_lab.errors import UserError
from mergekit_lab.runtime import log
from mergekit_lab.similarity.measures import Score, _grouped, get_measure, grad_norms


@dataclass
class Outputs:
    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class Reference:
    state: dict[str, torch.Tensor]  # the tuned module's tensors (delta + head), folder names
    logits: torch.Tensor | None  # classifiers: the reference's dev logits
    delta: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    seconds: float
    model: Any = None  # text-to-text: the tuned reference model (kl runs it beside each source)


@dataclass
class Tuned:
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    dev_score: float
    seconds: float


@dataclass
class TargetContext:
    """Everything the measures need for one target task (see module docstring)."""

    task: Any
    tokenizer: Any
    base: torch.nn.Module  # backbone + target head (eval copies are made per source)
    dev: Any  # encoded dev examples
    pool_config: ModuleFolder  # the configuration of a fresh reference module
    run: Any
    training: Any
    train_loader: Any = None  # callable -> encoded training examples (loaded only when needed)
    head: str = "reference"
    categories: dict[str, str] = field(default_factory=dict)
    batch_size: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _outputs: dict[str, Any] = field(default_factory=dict)
    #: text-to-text: compute kl in the same pass as the other output measures (set by score_sources
    #: when kl is among the measures, so a source is not run twice)
    seq_kl: bool = False
    _tuned: dict[str, Tuned] = field(default_factory=dict)
    _reference: Reference | None = None
    _zero_shot: float | None = None
    _train: Any = None
    _collate: Any = None

    # -- helpers -----------------------------------------------------------------------------
    @property
    def seq2seq(self) -> bool:
        """A text-to-text target (T5 on a ``t2t/`` task): the measures read decoder token outputs."""
        return getattr(self.task, "family", None) == "seq2seq"

    def collate(self, features):
        if self._collate is None:
            self._collate = self.task.collator(self.tokenizer)
        return self._collate(features)

    def train_data(self):
        if self._train is None:
            if self.train_loader is None:
                raise UserError(f"target {self.task.name} has no training data for the short tunes")
            self._train = self.train_loader()
        return self._train

    def _plug(self, src: ModuleFolder, *, trainable: bool) -> torch.nn.Module:
        model = copy.deepcopy(self.base)
        load_head = self.head == "source"
        return attach_module(model, src, trainable=trainable, load_head=load_head, seed=self.run.seed).to(self.device)

    def _signed_primary(self, metrics: dict[str, float]) -> float:
        v = float(metrics[self.task.primary_metric])
        return v if self.task.greater_is_better else -v

    def _predict(self, model) -> Outputs:
        from mergekit_lab.evaluation.evaluate import predict

        logits, labels, mask = predict(model, self.dev, self.collate, None, self.batch_size, "similarity")
        return Outputs(torch.from_numpy(logits), torch.from_numpy(labels),
                       torch.from_numpy(mask) if mask is not None else None)

    def _fit(self, model, description: str) -> float:
        from mergekit_lab.training import fit

        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="mklab-sim-") as wd:
            fit(model, self.train_data(), training=self.training, run=self.run, workdir=Path(wd),
                collate_fn=self.collate, compute_loss=self.task.compute_loss, description=description)
        model.eval()
        return time.time() - t0

    # -- what the measures call ----------------------------------------------------------------
    def ensure_reference(self) -> Reference:
        """Tune a fresh module of the pool's configuration on the target (once per target)."""
        if self._reference is not None:
            return self._reference
        model = apply_folder_config(copy.deepcopy(self.base), self.pool_config, seed=self.run.seed).to(self.device)
        secs = self._fit(model, f"reference tune {self.task.name}")
        state = module_state_dict(model)
        heads = self.pool_config.heads()
        delta = {k: v for k, v in state.items() if not is_head_key(k, heads)}
        head = {}
        for k, v in state.items():
            if is_head_key(k, heads):
                for prefix in ("base_model.model.", "base_model."):
                    if k.startswith(prefix):
                        k = k[len(prefix):]
                        break
                head[k] = v
        if self.seq2seq:
            for p in model.parameters():
                p.requires_grad_(False)
            self._reference = Reference(state, None, delta, head, secs, model=model.eval())
        else:
            self._reference = Reference(state, self._predict(model).logits, delta, head, secs)
        if self.head == "reference" and head:
            own = self.base.state_dict()
            unknown = [k for k in head if k not in own]
            if unknown:
                raise UserError(f"reference head tensors {unknown} do not fit the backbone")
            self.base.load_state_dict(head, strict=False)
        log(f"reference module tuned on {self.task.name} in {secs:.1f}s")
        return self._reference

    @property
    def reference(self) -> Reference:
        return self.ensure_reference()

    def outputs(self, src: ModuleFolder) -> Outputs:
        key = str(src.path)
        if key not in self._outputs:
            self._outputs[key] = self._predict(self._plug(src, trainable=False))
        return self._outputs[key]

    def seq_outputs(self, src: ModuleFolder, *, kl: bool = False) -> dict[str, torch.Tensor]:
        """Text-to-text: per-example sums over the target tokens (ce, el2n, cos[, kl], tokens)."""
        from mergekit_lab.similarity.measures import seq2seq_token_stats

        kl = kl or self.seq_kl
        key = str(src.path)
        cached = self._outputs.get(key)
        if cached is not None and (not kl or "kl" in cached):
            return cached
        ref = self.reference.model if kl else None
        model = self._plug(src, trainable=False)
        loader = torch.utils.data.DataLoader(self.dev, batch_size=self.batch_size, shuffle=False,
                                             collate_fn=self.collate)
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = model(**batch).logits
                ref_logits = ref(**batch).logits if ref is not None else None
                for k, v in seq2seq_token_stats(logits, batch["labels"], ref_logits).items():
                    parts.setdefault(k, []).append(v.cpu())
        self._outputs[key] = {k: torch.cat(v) for k, v in parts.items()}
        return self._outputs[key]

    def grand(self, src: ModuleFolder) -> Score:
        model = self._plug(src, trainable=True)
        params = delta_parameters(model)
        if not params:
            raise UserError(f"module {src.name} has no trainable delta parameters")
        model.train()
        loader = torch.utils.data.DataLoader(self.dev, batch_size=self.batch_size, shuffle=False,
                                             collate_fn=self.collate)
        torch.manual_seed(self.run.seed)
        norms, groups = [], []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = self.task.compute_loss(model, batch)
            n, sq = grad_norms(loss, params)
            norms.append(n)
            groups.append(_grouped(sq, "norm"))
        out: dict[str, dict[str, float]] = {}
        for gran in ("block", "layer"):
            keys = groups[0][gran].keys() if groups else []
            out[gran] = {g: sum(x[gran][g] for x in groups) / len(groups) for g in keys}
        return Score(sum(norms) / len(norms), out)

    def tuned(self, src: ModuleFolder) -> Tuned:
        key = str(src.path)
        if key not in self._tuned:
            model = self._plug(src, trainable=True)
            heads = src.heads()
            before = {k: v for k, v in module_state_dict(model).items() if not is_head_key(k, heads)}
            secs = self._fit(model, f"short tune {src.name} on {self.task.name}")
            after = {k: v for k, v in module_state_dict(model).items() if not is_head_key(k, heads)}
            score = self._signed_primary(self.task.evaluate(model, self.dev, self.tokenizer,
                                                            batch_size=self.batch_size, description="similarity"))
            self._tuned[key] = Tuned(before, after, score, secs)
        return self._tuned[key]

    def zero_shot_score(self) -> float:
        if self._zero_shot is None:
            model = copy.deepcopy(self.base).to(self.device)
            self._zero_shot = self._signed_primary(self.task.evaluate(model, self.dev, self.tokenizer,
                                                                      batch_size=self.batch_size,
                                                                      description="similarity"))
        return self._zero_shot

    def source_delta(self, src: ModuleFolder) -> dict[str, torch.Tensor]:
        return src.tensors(heads=False)

    def same_category(self, src: ModuleFolder) -> bool:
        cat = self.categories.get(self.task.name)
        return cat is not None and self.categories.get(src.task or "") == cat


def score_sources(ctx: TargetContext, sources: list[ModuleFolder], measure_names: list[str]) -> dict[str, Any]:
    """Scores (and seconds) of every source under every measure, for one target."""
    measures = [get_measure(m) for m in measure_names]
    ctx.seq_kl = ctx.seq2seq and any(m.name == "kl" for m in measures)
    # classifiers need the reference module's head for every measure; text-to-text targets only
    # for the measures that compare with the reference (kl, cos_weights)
    if (ctx.head == "reference" and not ctx.seq2seq) or any(m.needs_reference for m in measures):
        if not all(m.baseline for m in measures):
            ctx.ensure_reference()
    out: dict[str, Any] = {}
    for m in measures:
        scores, groups, seconds = {}, {"block": {}, "layer": {}}, {}
        for src in sources:
            t0 = time.time()
            sc = m.fn(ctx, src)
            seconds[src.name] = round(time.time() - t0, 3)
            scores[src.name] = sc.value
            for gran, per in sc.groups.items():
                for g, v in per.items():
                    groups[gran].setdefault(g, {})[src.name] = v
        out[m.name] = {"scores": scores, "groups": groups if m.grouped else {}, "seconds": seconds}
    return out
