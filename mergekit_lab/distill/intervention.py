"""Interchange interventions, computed in ONE forward pass per model.

Sources: the source of base example ``i`` is another example ``perm[i]`` of the same batch
(``perm`` is a fresh random derangement every step, so pairs are re-drawn every step, a
superset of the paper's "re-paired every epoch"). The source activations at a block are then
exactly the base pass's activations of row ``perm[i]`` at that block: no separate source pass
is needed at all (the original ran 3 full passes per model per step).

One pass per model: the batch of B runs normally up to the first intervened block. That
block's forward hook returns ``cat([clean, intervened])`` (2B rows), where ``intervened`` is
``clean`` with the mapped hidden dimensions at the chosen positions replaced by the source
row's values. Forward pre-hooks on the later blocks duplicate their batch-sized arguments
(attention masks, position ids), so rows [0, B) finish the standard run (used for the standard
losses) and rows [B, 2B) the counterfactual run. Blocks below the intervened one are computed
once. Several intervened blocks (``$L:[0:4]``) are handled the same way: at each later block,
the intervened rows get the clean rows' (source) values written at that block's output.

The same block's output is read (source) and written (base), positions are chosen among real
tokens only (never padding), and the counts of positions of base i and its source are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mergekit_lab.distill.student import get_layers, is_causal_lm
from mergekit_lab.errors import UserError

POSITION_MODES = ("consecutive", "random", "masked")


@dataclass
class InterventionPlan:
    """perm[i] = source row of base row i; base_mask[i] = written positions of row i;
    source_mask[i] = read positions *in row perm[i]* (same count per row as base_mask[i])."""

    perm: torch.Tensor
    base_mask: torch.Tensor
    source_mask: torch.Tensor

    def to(self, device) -> InterventionPlan:
        return InterventionPlan(self.perm.to(device), self.base_mask.to(device), self.source_mask.to(device))

    @property
    def num_positions(self) -> int:
        return int(self.base_mask.sum())


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (identity when n == 1)."""
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    p = rng.permutation(n)
    for i in range(n):
        if p[i] == i:
            j = (i + 1) % n
            p[i], p[j] = p[j], p[i]
    return p.astype(np.int64)


def sample_plan(
    attention_mask: torch.Tensor,
    *,
    prop: float = 0.3,
    max_tokens: int | None = None,
    mode: str = "consecutive",
    mlm_labels: torch.Tensor | None = None,
    rng: np.random.Generator | None = None,
) -> InterventionPlan:
    """Choose sources and positions. k_i = int(min(len_i, len_src) * prop) (at least 1 when
    prop > 0), capped by ``max_tokens``; ``consecutive``: one span in each of base and source,
    ``random``: k random real positions in each, ``masked``: only MLM-masked positions."""
    if mode not in POSITION_MODES:
        raise UserError(f"unknown interchange position mode {mode!r}", hint=f"choose one of {POSITION_MODES}")
    if not 0.0 <= prop <= 1.0:
        raise UserError(f"interchange_prop {prop} must be in [0, 1]")
    if mode == "masked" and mlm_labels is None:
        raise UserError("interchange positions 'masked' need MLM labels (a masked-LM teacher)")
    rng = rng or np.random.default_rng()
    am = attention_mask.detach().cpu().numpy().astype(bool)
    B, L = am.shape
    perm = derangement(B, rng)
    cand = am if mode != "masked" else am & (mlm_labels.detach().cpu().numpy() != -100)
    base = np.zeros((B, L), dtype=bool)
    src = np.zeros((B, L), dtype=bool)
    lens = am.sum(1)
    for i in range(B):
        j = perm[i]
        cb, cs = np.flatnonzero(cand[i]), np.flatnonzero(cand[j])
        k = int(min(lens[i], lens[j]) * prop)
        if prop > 0 and k == 0:
            k = 1
        if max_tokens:
            k = min(k, int(max_tokens))
        k = min(k, cb.size, cs.size)
        if k <= 0:
            continue
        if mode == "consecutive":
            sb = rng.integers(0, cb.size - k + 1)
            ss = rng.integers(0, cs.size - k + 1)
            base[i, cb[sb : sb + k]] = True
            src[i, cs[ss : ss + k]] = True
        else:
            base[i, np.sort(rng.choice(cb, k, replace=False))] = True
            src[i, np.sort(rng.choice(cs, k, replace=False))] = True
    dev = attention_mask.device
    return InterventionPlan(torch.from_numpy(perm).to(dev), torch.from_numpy(base).to(dev), torch.from_numpy(src).to(dev))


def write_source(target: torch.Tensor, clean: torch.Tensor, plan: InterventionPlan, idx: torch.Tensor) -> torch.Tensor:
    """Return ``target`` with dims ``idx`` at plan.base_mask replaced by clean[perm] at plan.source_mask."""
    b_rows, b_pos = plan.base_mask.nonzero(as_tuple=True)
    s_rows, s_pos = plan.source_mask.nonzero(as_tuple=True)
    if b_rows.numel() == 0:
        return target
    idx = idx.to(target.device)
    vals = clean[plan.perm[s_rows][:, None], s_pos[:, None], idx[None, :]]
    out = target.clone()
    out[b_rows[:, None], b_pos[:, None], idx[None, :]] = vals.to(out.dtype)
    return out


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (used by ``capture_block_outputs``)."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


@dataclass
class DoubledOutput:
    logits: torch.Tensor  # (B, L, V) standard run
    last_hidden: torch.Tensor  # (B, L, H) output of the last block, standard run
    cf_logits: torch.Tensor | None = None  # (B, L, V) intervened run
    cf_last_hidden: torch.Tensor | None = None
    captured: dict | None = None  # block -> output (B or 2B rows) when asked


def forward_with_intervention(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: InterventionPlan | None = None,
    layer_idx: dict[int, torch.Tensor] | None = None,
    *,
    capture: tuple[int, ...] = (),
    logit_mask: torch.Tensor | None = None,
) -> DoubledOutput:
    """One forward of ``model`` giving the standard and (when ``plan``) the counterfactual outputs.

    With ``logit_mask`` (B, L) the LM head runs only at those positions (a pre-hook gathers its
    input): logits are then (N, V) rows in ``logit_mask.nonzero()`` order. The vocabulary
    projection dominates small models' cost, so this is much cheaper when only masked tokens
    are scored (``restrict_ce_to_mask``).
    """
    inner = getattr(model, "module", model)
    layers = get_layers(inner)
    B = input_ids.shape[0]
    active = plan is not None and layer_idx
    first = min(layer_idx) if active else None
    state: dict = {"last": None, "captured": {}}
    handles = []
    last = len(layers) - 1

    def make_out_hook(j: int):
        def hook(module, args, output):
            h = _first(output)
            if active and j in layer_idx:
                if j == first:
                    clean = h
                    inter = write_source(h, clean, plan, layer_idx[j])
                else:
                    clean, inter = h[:B], h[B:]
                    inter = write_source(inter, clean, plan, layer_idx[j])
                h = torch.cat([clean, inter], dim=0)
                output = _replace_first(output, h)
            if j in capture:
                state["captured"][j] = h
            if j == last:
                state["last"] = h
            return output

        return hook

    def dup_hook(module, args, kwargs):
        def dup(t):
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[0] == B:
                return torch.cat([t, t], dim=0)
            return t

        args = (args[0],) + tuple(dup(a) for a in args[1:]) if args else args
        kwargs = {k: (v if k == "hidden_states" else dup(v)) for k, v in kwargs.items()}
        return args, kwargs

    def gather_hook(module, args):
        h = args[0]
        m = logit_mask if h.shape[0] == B else torch.cat([logit_mask, logit_mask], dim=0)
        return (h[m.to(h.device).bool()],) + tuple(args[1:])

    try:
        if logit_mask is not None:
            handles.append(lm_head_input_module(inner).register_forward_pre_hook(gather_hook))
        for j, layer in enumerate(layers):
            if active and j > first:
                handles.append(layer.register_forward_pre_hook(dup_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(make_out_hook(j)))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if is_causal_lm(inner):
            kwargs["use_cache"] = False
        logits = model(**kwargs).logits
    finally:
        for h in handles:
            h.remove()
    hidden = state["last"]
    if not active:
        return DoubledOutput(logits, hidden, captured=state["captured"])
    n = logits.shape[0] // 2 if logit_mask is not None else B
    return DoubledOutput(logits[:n], hidden[:B], logits[n:], hidden[B:], captured=state["captured"])


def lm_head_input_module(model: nn.Module) -> nn.Module:
    """The first module of the LM head (its input is the final hidden states, (B, L, H))."""
    for attr in ("cls", "lm_head", "vocab_transform"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise UserError(f"no LM head found on {type(model).__name__}")


def capture_block_outputs(model: nn.Module, input_ids, attention_mask, blocks: tuple[int, ...]) -> dict:
    """Outputs of the given blocks; the pass stops after the highest one (no wasted layers)."""
    inner = getattr(model, "module", model)
    layers = get_layers(inner)
    out: dict = {}
    top = max(blocks)
    handles = []

    def make(j):
        def hook(module, args, output):
            out[j] = _first(output)
            if j == top:
                raise StopForward

        return hook

    try:
        for j in blocks:
            handles.append(layers[j].register_forward_hook(make(j)))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if is_causal_lm(inner):
            kwargs["use_cache"] = False
        try:
            model(**kwargs)
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return out
