"""The distillation loop (standard DistilBERT-style and DIITO) on Accelerate.

One optimisation step = ``gradient_accumulation_steps`` micro-batches; each micro-batch runs the
teacher once (no grad) and the student once, both through
:func:`~mergekit_lab.distill.intervention.forward_with_intervention`, which yields the standard
and (when a causal loss has weight) the counterfactual outputs from one pass. DDP, mixed
precision, accumulation and clipping come from the Accelerator; AdamW (betas 0.9/0.98, eps 1e-6)
with linear warmup and decay as in the original.

Data order, MLM masks, intervention plans and mapping choices are derived from
(seed, rank, epoch, batch index), and checkpoints hold the student weights (safetensors), the
optimizer/scheduler state and RNG state, so ``--resume`` continues the exact sequence of steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_lab.distill.binarize import BinarizedCorpus, load_token_counts
from mergekit_lab.distill.data import (
    LengthGroupedBatches,
    LmSequences,
    MlmMasker,
    clm_labels,
    collate,
    token_probabilities,
)
from mergekit_lab.distill.intervention import forward_with_intervention, sample_plan
from mergekit_lab.distill.losses import LossWeights, distillation_losses
from mergekit_lab.distill.mapping import NeuronMapping
from mergekit_lab.distill.settings import DistillSettings
from mergekit_lab.distill.student import (
    get_layers,
    hidden_size,
    is_causal_lm,
    load_lm,
    position_embedding_params,
)
from mergekit_lab.errors import UserError

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")


class Interrupted(Exception):
    """Raised by ``stop_after_steps`` to simulate an interruption (checkpoint kept)."""


@dataclass
class DistillResult:
    global_step: int = 0
    epochs_done: float = 0.0
    train_seconds: float = 0.0
    sequences_seen: int = 0
    tokens_seen: int = 0
    final_losses: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    eval: dict[str, float] = field(default_factory=dict)


def loss_weights(settings: DistillSettings) -> LossWeights:
    lo = settings.losses
    return LossWeights(
        ce=lo.alpha_ce,
        mlm=lo.alpha_mlm,
        clm=lo.alpha_clm,
        mse=lo.alpha_mse,
        cos=lo.alpha_cos,
        causal_ce=lo.alpha_causal_ce,
        causal_cos=lo.alpha_causal_cos,
    )


def check_setup(teacher, student, settings: DistillSettings, corpus: BinarizedCorpus) -> None:
    """Everything that can be checked before training starts (UserError otherwise)."""
    w = loss_weights(settings)
    t_causal, s_causal = is_causal_lm(teacher), is_causal_lm(student)
    if t_causal != s_causal:
        raise UserError("teacher and student must both be masked LMs or both causal LMs")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's ({student.config.vocab_size})"
        )
    if corpus.header.get("max_token_id", -1) >= student.config.vocab_size:
        raise UserError(
            f"corpus {corpus.path} has token ids up to {corpus.header['max_token_id']} but the models' vocabulary "
            f"has {student.config.vocab_size}",
            hint="binarize with the teacher's tokenizer",
        )
    if (w.cos > 0 or w.causal_cos > 0) and hidden_size(teacher) != hidden_size(student):
        raise UserError(
            f"cosine losses need equal hidden sizes (teacher {hidden_size(teacher)}, student {hidden_size(student)})",
            hint="set alpha_cos and alpha_causal_cos to 0",
        )
    if t_causal and w.mlm > 0:
        raise UserError("alpha_mlm needs masked LMs; use alpha_clm for GPT-2")
    if not t_causal and w.clm > 0:
        raise UserError("alpha_clm needs causal LMs; use alpha_mlm for BERT-like models")
    if settings.interchange.interchange_masked_only and t_causal:
        raise UserError("interchange_masked_only needs masked LMs")
    if sum(w.as_dict().values()) <= 0:
        raise UserError("every loss weight is 0", hint="set e.g. --alpha-ce 0.5 --alpha-mlm 0.5")


def _optimizer(student, tr) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_epsilon)


def make_scheduler(kind: str, optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then linear decay (the original), cosine or constant; LambdaLR (light import)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if kind != "constant" else 1.0
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        raise UserError(f"lr_scheduler_type {kind!r} is not supported by distill", hint="use linear, cosine or constant")

    factor(warmup)  # validate the kind now
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _latest_checkpoint(workdir: Path) -> Path | None:
    ckdir = workdir / "checkpoints"
    if not ckdir.is_dir():
        return None
    cks = [p for p in ckdir.glob("step-*") if (p / "state.json").is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


def _save_checkpoint(workdir: Path, acc, student, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_model

    acc.wait_for_everyone()
    if acc.is_main_process:
        ckdir = workdir / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        final = ckdir / f"step-{state['global_step']}"
        tmp = ckdir / f".tmp-step-{state['global_step']}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(acc.unwrap_model(student), str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckdir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(ck: Path, acc, student, optimizer, scheduler) -> dict:
    from safetensors.torch import load_model

    load_model(acc.unwrap_model(student), str(ck / "student.safetensors"), device=str(acc.device))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(ck / "torch_rng.pt", weights_only=True))
    return json.loads((ck / "state.json").read_text())


def distill(settings: DistillSettings, workdir: Path, accelerator=None, *, log_fn=None) -> tuple[Any, DistillResult]:
    """Run distillation; write checkpoints and ``train_log.jsonl`` into ``workdir``.

    Returns (unwrapped student, result). The caller saves the student.
    """
    from mergekit_lab.runtime import log, make_accelerator, make_progress, seed_everything

    log_fn = log_fn or log
    run, tr, lo, ic, dd = settings.run, settings.training, settings.losses, settings.interchange, settings.data
    if settings.models.teacher is None or settings.models.student is None:
        raise UserError("distill needs --teacher and --student")
    if dd.data is None:
        raise UserError("distill needs --data (a folder from `mklab binarize`)")
    acc = accelerator or make_accelerator(run, tr.gradient_accumulation_steps)
    seed_everything(run.seed)
    workdir = Path(workdir)

    corpus = BinarizedCorpus(dd.data)
    teacher = load_lm(settings.models.teacher)
    student = load_lm(settings.models.student)
    check_setup(teacher, student, settings, corpus)
    weights = loss_weights(settings)
    causal_lm = is_causal_lm(student)
    mapping = None
    if weights.causal:
        mapping = NeuronMapping.load(ic.neuron_mapping, len(get_layers(teacher)), len(get_layers(student)))
        mapping.resolve(teacher, student)
        log_fn(f"neuron mapping {mapping.name}: " + "; ".join(mapping.describe()))
    teacher.eval().requires_grad_(False)
    if tr.freeze_pos_embs:
        for p in position_embedding_params(student):
            p.requires_grad_(False)

    max_pos = int(getattr(student.config, "max_position_embeddings", None) or student.config.n_positions)
    max_len = min(dd.max_seq_length, max_pos, int(getattr(teacher.config, "max_position_embeddings", 0) or teacher.config.n_positions))
    seqs = LmSequences(corpus, max_len=max_len, min_len=dd.min_seq_length, max_unk_fraction=dd.max_unk_fraction,
                       max_sequences=dd.max_sequences)
    special = corpus.special_token_ids
    pad_id = special.get("pad_token", special.get("eos_token", 0))
    masker = None
    if not causal_lm:
        if "mask_token" not in special:
            raise UserError(f"corpus {corpus.path} has no [MASK] token id; masked-LM distillation needs one")
        counts = load_token_counts(dd.token_counts) if dd.token_counts else None
        probs = token_probabilities(student.config.vocab_size, counts, list(special.values()), lo.mlm_smoothing)
        masker = MlmMasker(probs, special["mask_token"], mask_prop=lo.mlm_mask_prop, word_mask=lo.word_mask,
                           word_keep=lo.word_keep, word_rand=lo.word_rand)

    sampler = LengthGroupedBatches(seqs.lengths, tr.per_device_train_batch_size, seed=run.seed,
                                   rank=acc.process_index, world_size=acc.num_processes,
                                   group_by_length=dd.group_by_length)
    batches_per_epoch = len(sampler)
    steps_per_epoch = max(1, batches_per_epoch // tr.gradient_accumulation_steps)
    total_steps = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.num_train_epochs * steps_per_epoch))
    optimizer = _optimizer(student, tr)
    warmup = math.ceil(total_steps * tr.warmup_ratio)
    scheduler = make_scheduler(tr.lr_scheduler_type, optimizer, warmup, total_steps)
    student, optimizer = acc.prepare(student, optimizer)
    teacher.to(acc.device)
    inner_student = acc.unwrap_model(student)

    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "sequences_seen": 0, "tokens_seen": 0}
    result = DistillResult()
    ck = _latest_checkpoint(workdir) if run.resume else None
    if ck is not None:
        state = _load_checkpoint(ck, acc, student, optimizer, scheduler)
        result.resumed_from = state["global_step"]
        log_fn(f"resumed from {ck} (step {state['global_step']})")
    log_fn(
        f"distill: {len(seqs)} sequences ({seqs.num_tokens:,} tokens), {batches_per_epoch} batches/epoch/process, "
        f"{total_steps} steps of {tr.per_device_train_batch_size}x{tr.gradient_accumulation_steps}x{acc.num_processes}; "
        f"losses {', '.join(f'{k}={v}' for k, v in weights.as_dict().items() if v > 0)}"
    )

    sparse_logits = lo.restrict_ce_to_mask and not causal_lm
    log_path = workdir / "train_log.jsonl"
    mode = "masked" if ic.interchange_masked_only else ("consecutive" if ic.interchange_consecutive_only else "random")
    window: dict[str, torch.Tensor] = {}
    window_n = torch.zeros((), device=acc.device)
    t_start = time.time()
    window_tokens = 0
    window_t0 = time.time()
    done = state["global_step"] >= total_steps
    micro = 0
    student.train()
    with make_progress() as bar:
        task = bar.add_task("distill", total=total_steps, completed=state["global_step"], info="")
        while not done:
            sampler.set_epoch(state["epoch"], skip=state["batch_in_epoch"])
            for indices in sampler:
                b_idx = state["batch_in_epoch"]
                seed_seq = [run.seed, acc.process_index, state["epoch"], b_idx]
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed_seq).generate_state(1)[0]))
                rng = np.random.default_rng(seed_seq)
                batch = collate([seqs[i] for i in indices], pad_id)
                ids, am = batch["input_ids"], batch["attention_mask"]
                if masker is not None:
                    ids, labels = masker(ids, am, generator=gen)
                else:
                    labels = clm_labels(ids, am)
                plan = pair = None
                if mapping is not None:
                    plan = sample_plan(am, prop=ic.interchange_prop, max_tokens=ic.interchange_max_token, mode=mode,
                                       mlm_labels=labels if mode == "masked" else None, rng=rng)
                    pair = mapping.resolved[int(rng.integers(len(mapping.resolved)))]
                ids, am, labels = ids.to(acc.device), am.to(acc.device), labels.to(acc.device)
                if plan is not None:
                    plan = plan.to(acc.device)
                # only masked tokens are scored: run the LM heads there only (much cheaper)
                lmask = (labels != -100) if sparse_logits else None
                with acc.accumulate(student):
                    with torch.no_grad(), acc.autocast():
                        t_out = forward_with_intervention(teacher, ids, am, plan, pair.teacher if pair else None,
                                                          logit_mask=lmask)
                    with acc.autocast():
                        s_out = forward_with_intervention(student, ids, am, plan, pair.student if pair else None,
                                                          logit_mask=lmask)
                        loss, terms = distillation_losses(
                            s_out, t_out, attention_mask=am, labels=labels, weights=weights,
                            temperature=lo.temperature, restrict_ce_to_mask=lo.restrict_ce_to_mask,
                        )
                    acc.backward(loss)
                    if acc.sync_gradients and tr.max_grad_norm > 0:
                        acc.clip_grad_norm_(student.parameters(), tr.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                terms = dict(terms, loss=loss.detach())
                for k, v in terms.items():
                    window[k] = window.get(k, torch.zeros((), device=acc.device)) + v.float()
                window_n += 1
                n_tok = int(am.sum())
                window_tokens += n_tok
                state["batch_in_epoch"] = b_idx + 1
                state["sequences_seen"] += len(indices) * acc.num_processes
                state["tokens_seen"] += n_tok * acc.num_processes
                micro += 1
                if micro % tr.gradient_accumulation_steps != 0:
                    continue
                scheduler.step()
                state["global_step"] += 1
                step = state["global_step"]
                if step % tr.logging_steps == 0 or step == total_steps:
                    keys = sorted(window)
                    vec = torch.stack([window[k] for k in keys] + [window_n])
                    vec = acc.reduce(vec, reduction="sum")
                    avg = {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}
                    dt = max(time.time() - window_t0, 1e-9)
                    rec = {"step": step, "epoch": state["epoch"] + state["batch_in_epoch"] / batches_per_epoch,
                           "lr": scheduler.get_last_lr()[0], **avg,
                           "tokens_per_second": window_tokens * acc.num_processes / dt,
                           "tokens_seen": state["tokens_seen"]}
                    result.final_losses = avg
                    if acc.is_main_process:
                        with open(log_path, "a") as fh:
                            fh.write(json.dumps(rec) + "\n")
                    bar.update(task, info="  ".join(f"{k} {v:.3f}" for k, v in avg.items())
                               + f"  {rec['tokens_per_second']:,.0f} tok/s")
                    window, window_n = {}, torch.zeros((), device=acc.device)
                    window_tokens, window_t0 = 0, time.time()
                bar.update(task, completed=step)
                if tr.save_steps and step % tr.save_steps == 0 and step < total_steps:
                    _save_checkpoint(workdir, acc, student, optimizer, scheduler, state)
                if tr.stop_after_steps and step >= tr.stop_after_steps and step < total_steps:
                    _save_checkpoint(workdir, acc, student, optimizer, scheduler, state)
                    raise Interrupted(f"stopped after step {step} (stop_after_steps); resume with --resume")
                if step >= total_steps:
                    done = True
                    break
            if not done:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    result.global_step = state["global_step"]
    result.epochs_done = state["epoch"] + state["batch_in_epoch"] / batches_per_epoch
    result.train_seconds = time.time() - t_start
    result.sequences_seen = state["sequences_seen"]
    result.tokens_seen = state["tokens_seen"]
    acc.wait_for_everyone()
    return inner_student, result
