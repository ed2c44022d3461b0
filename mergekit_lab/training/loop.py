"""The shared Accelerate training loop (fine-tuning, PEFT modules, prompt tuning).

``fit`` runs AdamW with warmup and a schedule, gradient accumulation, mixed precision, gradient
clipping, evaluation every ``eval_steps`` (default: each epoch end), best-checkpoint selection,
early stopping, checkpoints every ``save_steps`` and ``resume`` from the last one. The same
command runs on one CPU, one GPU, or several processes under torchrun / accelerate launch.

Checkpoints live in ``workdir/checkpoints/step-N`` and hold only safe formats: the trainable
weights (safetensors), the optimizer and scheduler state (torch.save, read back with
``weights_only=True``), RNG states and the loop state (JSON).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mergekit_lab.runtime import log, make_accelerator, make_progress

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_")


@dataclass
class FitResult:
    global_step: int = 0
    epochs_done: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    train_loss: float | None = None
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # batches already consumed in the current epoch
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    samples_seen: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def default_param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr})
    return [g for g in groups if g["params"]]


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def default_compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task=None) -> torch.Tensor:
    """The task's loss (masked BCE for multi-label, MSE, CE) when a task is given, else the model's."""
    if task is None:
        return model(**{k: v for k, v in batch.items() if k != "label_mask"}).loss
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "label_mask")})
    return task.loss(out.logits, batch["labels"], batch.get("label_mask"))


def _rng_state() -> dict[str, Any]:
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def latest_checkpoint(workdir: Path) -> Path | None:
    ckdir = workdir / "checkpoints"
    if not ckdir.is_dir():
        return None
    done = [p for p in ckdir.glob("step-*") if (p / "state.json").exists()]
    if not done:
        return None
    return max(done, key=lambda p: int(p.name.split("-")[1]))


def fit(
    model: torch.nn.Module,
    train_dataset,
    *,
    training,
    run,
    workdir: Path,
    collate_fn: Callable,
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    metric_for_best: str | None = None,
    greater_is_better: bool = True,
    compute_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    accelerator=None,
    callbacks: Iterable[Callable[[LoopState], None]] = (),
    description: str = "train",
) -> FitResult:
    """Train ``model`` in place; at the end it holds the best (or last) weights."""
    workdir = Path(workdir)
    accelerator = accelerator or make_accelerator(run, training.gradient_accumulation_steps)
    torch.manual_seed(run.seed)
    compute_loss = compute_loss or default_compute_loss
    metric_for_best = training.metric_for_best_model or metric_for_best
    if metric_for_best and metric_for_best.endswith("loss"):
        greater_is_better = False

    g = torch.Generator()
    g.manual_seed(run.seed)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=training.per_device_train_batch_size, shuffle=True,
        collate_fn=collate_fn, generator=g, drop_last=False,
    )
    groups = param_groups or default_param_groups(model, training.learning_rate, training.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=training.learning_rate)

    accum = training.gradient_accumulation_steps
    # batches per process per epoch after sharding
    n_proc = accelerator.num_processes
    batches_per_epoch = math.ceil(len(loader) / n_proc)
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    if training.max_steps and training.max_steps > 0:
        total_steps = training.max_steps
    else:
        total_steps = max(1, math.ceil(updates_per_epoch * training.num_train_epochs))
    num_epochs = math.ceil(total_steps / updates_per_epoch)
    warmup = math.ceil(training.warmup_ratio * total_steps)

    from transformers import get_scheduler

    scheduler = get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = LoopState()
    result = FitResult()
    best_dir = workdir / "best"
    ck = latest_checkpoint(workdir) if run.resume else None
    if ck is not None:
        _load_checkpoint(ck, accelerator, model, optimizer, scheduler, state)
        result.resumed_from = state.global_step
        log(f"resumed from {ck} (step {state.global_step})")

    eval_every = training.eval_steps
    save_every = training.save_steps
    start = time.time()
    seen_at_start = state.samples_seen
    stop = False

    last_eval = [-1]

    def do_eval() -> None:
        nonlocal stop
        if evaluate_fn is None or last_eval[0] == state.global_step:
            return
        last_eval[0] = state.global_step
        metrics = evaluate_fn(accelerator.unwrap_model(model))
        model.train()
        entry = {"step": state.global_step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        state.history.append(entry)
        key = metric_for_best or next(iter(metrics), None)
        if key is None or key not in metrics:
            return
        value = float(metrics[key])
        better = state.best_metric is None or (value > state.best_metric if greater_is_better else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.bad_evals = value, state.global_step, 0
            if accelerator.is_main_process:
                best_dir.mkdir(parents=True, exist_ok=True)
                save_file(_trainable_state(accelerator.unwrap_model(model)), str(best_dir / "weights.safetensors"))
                (best_dir / "best.json").write_text(json.dumps({"step": state.global_step, key: value}))
            accelerator.wait_for_everyone()
        else:
            state.bad_evals += 1
            if training.early_stopping_patience and state.bad_evals >= training.early_stopping_patience:
                log(f"early stopping at step {state.global_step}: no {key} improvement in {state.bad_evals} evaluations")
                result.stopped_early = True
                stop = True
        log(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                    if isinstance(v, (int, float))))

    model.train()
    bar = make_progress()
    with bar:
        ptask = bar.add_task(description, total=total_steps, completed=state.global_step, info="")
        while state.epoch < num_epochs and state.global_step < total_steps and not stop:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
            epoch_loader = loader
            if state.step_in_epoch:
                epoch_loader = accelerator.skip_first_batches(loader, state.step_in_epoch)
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = compute_loss(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and training.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state.step_in_epoch += 1
                bs = int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
                state.samples_seen += bs * n_proc
                state.loss_sum += float(loss.detach())
                state.loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                elapsed = max(time.time() - start, 1e-9)
                sps = (state.samples_seen - seen_at_start) / elapsed
                lr = scheduler.get_last_lr()[0]
                avg = state.loss_sum / max(state.loss_count, 1)
                bar.update(ptask, completed=state.global_step,
                           info=f"loss {avg:.4f}  lr {lr:.2e}  {sps:.1f} samples/s")
                if state.global_step % training.logging_steps == 0:
                    state.history.append({"step": state.global_step, "loss": avg, "lr": lr})
                    result.train_loss = avg
                    state.loss_sum, state.loss_count = 0.0, 0
                if eval_every and state.global_step % eval_every == 0:
                    do_eval()
                if save_every and state.global_step % save_every == 0:
                    _save_checkpoint(workdir, accelerator, model, optimizer, scheduler, state)
                for cb in callbacks:
                    cb(state)
                if stop or state.global_step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
                if not eval_every:
                    do_eval()
                continue
            # left the epoch early (max steps or early stopping)
            if state.step_in_epoch >= batches_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
            break
    do_eval()  # the final weights are always evaluated (no-op if just done)

    if state.loss_count:
        result.train_loss = state.loss_sum / state.loss_count
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if evaluate_fn is not None and (best_dir / "weights.safetensors").exists():
        best = load_file(str(best_dir / "weights.safetensors"))
        missing = unwrapped.load_state_dict(best, strict=False)
        del missing
        log(f"loaded the best checkpoint (step {state.best_step}, {metric_for_best} {state.best_metric:.4f})")
    elapsed = time.time() - start
    result.global_step = state.global_step
    result.epochs_done = state.epoch + state.step_in_epoch / max(batches_per_epoch, 1)
    result.best_metric = state.best_metric
    result.best_step = state.best_step
    result.history = state.history
    result.train_seconds = round(elapsed, 3)
    result.samples_per_second = round((state.samples_seen - seen_at_start) / max(elapsed, 1e-9), 3)
    if accelerator.is_main_process:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        shutil.rmtree(best_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


def _save_checkpoint(workdir: Path, accelerator, model, optimizer, scheduler, state: LoopState) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckdir = workdir / "checkpoints"
        final = ckdir / f"step-{state.global_step}"
        tmp = ckdir / f".tmp-step-{state.global_step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_trainable_state(accelerator.unwrap_model(model)), str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
        (tmp / "rng.json").write_text(json.dumps(_rng_state()))
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckdir.glob("step-*"):  # keep the newest only
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(ck: Path, accelerator, model, optimizer, scheduler, state: LoopState) -> None:
    weights = load_file(str(ck / "weights.safetensors"))
    accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(ck / "torch_rng.pt", weights_only=True))
    _set_rng_state(json.loads((ck / "rng.json").read_text()))
    saved = json.loads((ck / "state.json").read_text())
    for k, v in saved.items():
        setattr(state, k, v)
