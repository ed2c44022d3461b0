"""Statistics for data-aware merging: RegMean Gram matrices and diagonal Fisher information.

Both are computed once per model from (model, iterable of batch dicts with ``input_ids``,
``attention_mask`` and ``labels``) and stored as safetensors with a JSON description of how they
were computed under the ``mklab_stats`` metadata key (kind, variant, examples, tokens, padding
rule, dtype, statistics format version, a description of the data and a fingerprint of the
model weights). :func:`ensure_statistics` reuses a stored file when that description matches the
request and recomputes otherwise.

Grams: a forward hook on every ``nn.Linear`` and GPT-2 style ``Conv1D`` accumulates X^T X of the
layer's inputs; rows at padding positions (``attention_mask == 0``) are excluded whenever the
input has the batch's (batch, seq) shape; the running sum is kept in float64 (default) or
float32 and divided by the number of rows at the end (G = X^T X / n). Consecutive layers fed the very
same input tensor (e.g. attention q/k/v) share one product. Computed in eval mode
under ``torch.no_grad``.

Fisher: F = mean over batches of (grad of the batch loss)^2 (as in the RegMean paper's code;
``per_example=True`` gives the per-example estimate of Matena & Raffel), with the loss
``hard`` = NLL of the model's own argmax prediction, ``empirical`` = the loss against the gold
labels, ``soft`` = the expectation over the model's predictive distribution of the squared
gradient, sum_c p_c (grad log p_c)^2 (one backward pass per class; per label Bernoulli for
multi-label heads, where it is sigma(1-sigma) (grad z)^2). **Ours**: the "loss-level" soft form
sum_c stopgrad(p_c) NLL(c) has an identically zero gradient at the model's own distribution
(d/dz = softmax(z) - p = 0), so the expectation is taken outside the square, as Matena & Raffel
define the Fisher. For multi-label heads, predictions are
per-label Bernoulli (targets: logits > 0 for hard, sigmoid for soft) and an optional
``loss_fn(logits, targets, label_mask)`` masks unannotated labels. Regression heads always use
the empirical variant (the others have zero gradient), which is recorded in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mergekit_lab.errors import UserError
from mergekit_lab.merging._progress import log, track

STATS_VERSION = 1
META_KEY = "mklab_stats"
STATS_SUBDIR = "mklab_stats"

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover
        return None


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, layout) for every nn.Linear ("linear") and GPT-2 Conv1D ("conv1d")."""
    conv1d = _conv1d_type()
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[name] = (mod, "linear")
        elif conv1d is not None and isinstance(mod, conv1d):
            out[name] = (mod, "conv1d")
    return out


def _model_inputs(batch: Mapping[str, Any], device: torch.device, drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k not in drop}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("input_ids", "attention_mask", "inputs_embeds"):
        if k in batch and torch.is_tensor(batch[k]):
            return int(batch[k].shape[0])
    return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])


def _capped(batches: Iterable[Mapping[str, Any]], max_examples: int | None):
    """Yield (batch, size) until ``max_examples`` examples were seen, cutting the last batch to fit."""
    seen = 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            return
        b = dict(batch)
        bs = _batch_size(b)
        if max_examples is not None and seen + bs > max_examples:
            keep = max_examples - seen
            b = {k: (v[:keep] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == bs else v) for k, v in b.items()}
            bs = keep
        seen += bs
        yield b, bs


@torch.no_grad()
def compute_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    max_examples: int | None = None,
    exclude_padding: bool = True,
    dtype: torch.dtype = torch.float64,
    modules: Iterable[str] | None = None,
    progress: bool = True,
    total_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Input Gram matrices G = X^T X / n of every linear layer.

    Returns (grams keyed by module name, info with ``layouts``, ``n_tokens`` per module,
    ``n_examples``, ``seconds``). ``labels``/``label_mask`` are not passed to the model.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mods = linear_modules(model)
    if modules is not None:
        wanted = set(modules)
        mods = {k: v for k, v in mods.items() if k in wanted}
    if not mods:
        raise UserError(f"{type(model).__name__} has no nn.Linear or Conv1D layers to collect Grams from")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in mods}
    state: dict[str, Any] = {"mask": None, "last": None}

    def make_hook(name: str):
        def hook(_mod, inputs, _out):
            x = inputs[0]
            last = state["last"]
            if last is not None and last[0] is x:
                hit = last[1]
            else:
                mask = state["mask"]
                if exclude_padding and mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                    rows = x[mask.bool()]
                else:
                    rows = x.reshape(-1, x.shape[-1])
                rows = rows.to(torch.float32 if dtype != torch.float64 else torch.float64)
                hit = (rows.T @ rows, rows.shape[0])
                # the same input object fed to the next layer (q/k/v, gate/up) is multiplied once;
                # holding the reference keeps its address from being reused meanwhile
                state["last"] = (x, hit)
            g, n = hit
            if name in sums:
                sums[name] += g.to(dtype)
            else:
                sums[name] = g.to(dtype).clone()
            counts[name] += n

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, (m, _) in mods.items()]
    n_examples = 0
    t0 = time.perf_counter()
    try:
        for b, bs in _capped(track(batches, total_batches, "RegMean Grams", enabled=progress), max_examples):
            inputs = _model_inputs(b, device, ("labels", "label_mask"))
            state["mask"] = inputs.get("attention_mask")
            state["last"] = None
            model(**inputs)
            n_examples += bs
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
        model.train(was_training)
    grams = {}
    for name in mods:
        if counts[name] == 0:
            continue
        grams[name] = (sums[name] / counts[name]).contiguous()
    info = {
        "layouts": {n: mods[n][1] for n in grams},
        "n_tokens": {n: counts[n] for n in grams},
        "n_examples": n_examples,
        "seconds": time.perf_counter() - t0,
    }
    return grams, info


def _infer_problem_type(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor | None) -> str:
    pt = getattr(getattr(model, "config", None), "problem_type", None)
    if pt:
        return pt
    if logits.dim() == 2 and logits.shape[-1] == 1:
        return "regression"
    if labels is not None and labels.is_floating_point() and labels.shape == logits.shape:
        return "multi_label_classification"
    return "single_label_classification"


def _own_prediction_loss(
    logits: torch.Tensor,
    variant: str,
    problem_type: str,
    batch: Mapping[str, Any],
    loss_fn: LossFn | None,
) -> torch.Tensor:
    label_mask = batch.get("label_mask")
    if problem_type == "multi_label_classification":
        targets = (logits > 0).to(logits.dtype)
        if loss_fn is not None:
            return loss_fn(logits, targets.detach(), label_mask)
        per = nn.functional.binary_cross_entropy_with_logits(logits, targets.detach(), reduction="none")
        if label_mask is not None:
            m = label_mask.to(per.dtype)
            return (per * m).sum() / m.sum().clamp(min=1)
        return per.mean()
    # single label, sequence (B, C) or token level (B, T, C)
    flat = logits.reshape(-1, logits.shape[-1])
    valid = None
    if logits.dim() == 3:
        labels = batch.get("labels")
        if labels is not None and labels.shape == logits.shape[:2]:
            valid = (labels != -100).reshape(-1)
        elif batch.get("attention_mask") is not None and batch["attention_mask"].shape == logits.shape[:2]:
            valid = batch["attention_mask"].reshape(-1).bool()
    if valid is not None:
        flat = flat[valid.to(flat.device)]
    logp = torch.log_softmax(flat, dim=-1)
    return -logp.gather(1, logp.argmax(-1, keepdim=True)).mean()


def _gold_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The standard loss against gold labels, or None when the shapes are not a classifier's."""
    if problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(logits.squeeze(-1).shape))
    if problem_type == "multi_label_classification" and labels.shape == logits.shape:
        per = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        m = batch.get("label_mask")
        if m is not None:
            m = m.to(per.dtype)
            return (per * m).sum() / m.sum().clamp(min=1)
        return per.mean()
    if labels.dim() == logits.dim() - 1 and labels.shape == logits.shape[:-1]:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
    return None


def _soft_objectives(
    logits: torch.Tensor, problem_type: str, batch: Mapping[str, Any]
) -> list[torch.Tensor]:
    """Objectives whose squared gradients, summed, give sum_c p_c (grad log p_c)^2 (mean over the
    batch's examples): one objective per class (or per label for multi-label heads)."""
    if problem_type == "multi_label_classification":
        s = torch.sigmoid(logits).detach()
        w = (s * (1 - s)).sqrt()
        label_mask = batch.get("label_mask")
        if label_mask is not None:
            w = w * label_mask.to(w.dtype)
        n = logits.shape[0]
        return [(w[..., j] * logits[..., j]).sum() / n for j in range(logits.shape[-1])]
    flat = logits.reshape(-1, logits.shape[-1])
    if logits.dim() == 3:
        labels = batch.get("labels")
        valid = None
        if labels is not None and labels.shape == logits.shape[:2]:
            valid = (labels != -100).reshape(-1)
        elif batch.get("attention_mask") is not None and batch["attention_mask"].shape == logits.shape[:2]:
            valid = batch["attention_mask"].reshape(-1).bool()
        if valid is not None:
            flat = flat[valid.to(flat.device)]
    logp = torch.log_softmax(flat, dim=-1)
    root_p = logp.detach().exp().sqrt()
    return [(root_p[:, c] * logp[:, c]).mean() for c in range(logp.shape[-1])]


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    variant: str = "hard",
    loss_fn: LossFn | None = None,
    problem_type: str | None = None,
    max_examples: int | None = None,
    per_example: bool = False,
    progress: bool = True,
    total_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Diagonal Fisher of every trainable parameter (see the module docstring for the variants).

    Returns (fisher keyed by parameter name, info with ``n_examples``, ``n_batches``,
    ``variant_effective``, ``seconds``).
    """
    if variant not in ("hard", "soft", "empirical"):
        raise UserError(f"unknown Fisher variant {variant!r}", hint="use hard, soft or empirical")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_examples = n_terms = 0
    effective = variant
    t0 = time.perf_counter()

    def one(b: dict[str, Any]) -> None:
        nonlocal effective, n_terms
        model.zero_grad(set_to_none=True)
        inputs = _model_inputs(b, device, ("labels", "label_mask"))
        labels = b.get("labels")
        labels = labels.to(device) if torch.is_tensor(labels) else None
        bb = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        out = model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        pt = problem_type or _infer_problem_type(model, logits, labels)
        var = "empirical" if pt == "regression" else variant
        effective = var
        if var == "empirical":
            if labels is None:
                raise UserError("the empirical Fisher needs labels in the batches")
            if loss_fn is not None:
                loss = loss_fn(logits, labels, bb.get("label_mask"))
            else:
                loss = _gold_loss(logits, labels, pt, bb)
                if loss is None:  # e.g. seq2seq: the model's own loss
                    loss = model(**inputs, labels=labels).loss
        elif var == "hard":
            loss = _own_prediction_loss(logits, var, pt, bb, loss_fn)
        else:
            objectives = _soft_objectives(logits, pt, bb)
            for j, obj in enumerate(objectives):
                model.zero_grad(set_to_none=True)
                obj.backward(retain_graph=j < len(objectives) - 1)
                for n, p in params.items():
                    if p.grad is not None:
                        sums[n] += p.grad.detach().float() ** 2
            n_terms += 1
            return
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss ({float(loss)}) while estimating the Fisher", hint="check the model and data")
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach().float() ** 2
        n_terms += 1

    try:
        for b, bs in _capped(track(batches, total_batches, f"Fisher ({variant})", enabled=progress), max_examples):
            if per_example:
                for i in range(bs):
                    one({k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == bs else v) for k, v in b.items()})
            else:
                one(b)
            n_examples += bs
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_terms == 0:
        raise UserError("no batches were given to estimate the Fisher information")
    fisher = {n: (s / n_terms).contiguous() for n, s in sums.items()}
    info = {
        "n_examples": n_examples,
        "n_batches": n_terms,
        "variant_effective": effective,
        "per_example": per_example,
        "seconds": time.perf_counter() - t0,
    }
    return fisher, info


# --------------------------------------------------------------------------- storage


def model_fingerprint(model_dir: str | Path) -> str:
    """A content fingerprint of a model folder's weight files (sizes + first/last MiB)."""
    from mergekit_lab.merging.io import weight_files

    _, files = weight_files(Path(model_dir))
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f.name.encode())
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (2 << 20):
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def save_statistics(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write statistics as safetensors with the JSON description under ``mklab_stats``
    (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": STATS_VERSION, **metadata}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


class StatisticsFile:
    """Lazy reader of a statistics file: ``metadata``, ``keys()``, ``get(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"statistics file {self.path} does not exist")
        from mergekit_lab.merging.io import SafetensorsFile

        self._h = SafetensorsFile(self.path)
        raw = (self._h.metadata or {}).get(META_KEY)
        if raw is None:
            raise UserError(f"{self.path} has no '{META_KEY}' metadata; it was not written by mklab")
        self.metadata: dict[str, Any] = json.loads(raw)
        self._keys = set(self._h.keys())

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "")

    def keys(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def get(self, name: str) -> torch.Tensor:
        return self._h.get(name)

    def layout(self, module: str) -> str | None:
        return self.metadata.get("layouts", {}).get(module)

    def check_finite(self) -> None:
        """UserError naming the first tensor with NaN/inf (one tensor in memory at a time)."""
        for k in self.keys():
            t = self.get(k)
            if not bool(torch.isfinite(t).all()):
                raise UserError(
                    f"statistics {self.path} contain NaN or inf in {k!r}",
                    hint="delete the file to recompute it (and check the model for NaN weights)",
                )

    def global_norm(self) -> float:
        s = 0.0
        for k in self.keys():
            s += float(self.get(k).double().pow(2).sum())
        return math.sqrt(s)


def load_statistics(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a statistics file fully (tensors, metadata)."""
    f = StatisticsFile(path)
    return {k: f.get(k) for k in f.keys()}, f.metadata


def statistics_path(model_dir: str | Path, kind: str, variant: str | None = None, stats_dir: str | Path | None = None) -> Path:
    """Where a model's statistics live: ``<model>/mklab_stats/<kind>[-<variant>].safetensors``
    (or under ``stats_dir/<model folder name>/`` when the model folder is not writable)."""
    fname = f"{kind}{'-' + variant if variant else ''}.safetensors"
    model_dir = Path(model_dir)
    if stats_dir is not None:
        key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]
        return Path(stats_dir) / f"{model_dir.name}-{key}" / fname
    return model_dir / STATS_SUBDIR / fname


def request_matches(stored: Mapping[str, Any], request: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether stored metadata satisfies a request: every requested key equal (and same version)."""
    if stored.get("version") != STATS_VERSION:
        return False, f"version {stored.get('version')} != {STATS_VERSION}"
    for k, v in request.items():
        if json.dumps(stored.get(k), sort_keys=True) != json.dumps(v, sort_keys=True):
            return False, f"{k}: stored {stored.get(k)!r}, requested {v!r}"
    return True, ""


def ensure_statistics(
    path: str | Path,
    request: Mapping[str, Any],
    compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
    *,
    force: bool = False,
) -> tuple[Path, bool]:
    """Reuse the statistics at ``path`` when their metadata match ``request``; otherwise call
    ``compute() -> (tensors, info)`` and store them with ``request`` + ``info`` as metadata.
    Returns (path, reused)."""
    path = Path(path)
    if path.exists() and not force:
        try:
            meta = StatisticsFile(path).metadata
        except Exception as e:  # unreadable: recompute
            ok, why = False, f"unreadable ({e})"
        else:
            ok, why = request_matches(meta, request)
        if ok:
            log(f"reusing statistics {path}")
            return path, True
        log(f"recomputing statistics {path}: {why}")
    tensors, info = compute()
    save_statistics(path, tensors, {**dict(request), **dict(info)})
    return path, False
