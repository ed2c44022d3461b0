"""The work behind ``mklab prompt-tune`` and adapter evaluation (callable from a notebook).

:func:`prompt_tune` loads the task and the frozen model, attaches a PT/DePT module, trains it
with the shared loop (:func:`mergekit_lab.training.fit`) using DePT's two learning rates, keeps
the best module by the task's first metric, saves it as a PEFT-layout adapter folder and writes
results.json with the exact trainable parameter count, dev metrics, time per step, tokens/s and
peak memory.

Encoder and decoder-only classifiers use the task registry's data and metrics unchanged.
Encoder-decoder models (T5) train on the registry's text-to-text form of the task (``t2t/<task>``:
seq2seq loss, evaluation by generation with invalid outputs counted wrong); only when no such
task is registered does the minimal hook in :mod:`mergekit_lab.prompt.text2text` take over.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from mergekit_lab.data import resolve_max_seq_length
from mergekit_lab.errors import UserError
from mergekit_lab.prompt.budget import match_pt_length
from mergekit_lab.prompt.settings import PromptOptions, PromptTuneSettings

DEFAULT_M = {"pt": 100, "dept": 60}
DEFAULT_R = 30


def resolve_shape(opts: PromptOptions, d: int, s: int) -> tuple[int, int | None, dict[str, Any] | None]:
    """(m, r, budget info) from the options; r is None for PT."""
    if opts.match_pt_length:
        L = opts.match_pt_length
        if opts.method == "pt":
            if opts.prefix_length not in (None, L):
                raise UserError(
                    f"--method pt with --match-pt-length {L} means --prefix-length {L}, not {opts.prefix_length}"
                )
            return L, None, {"pt_length": L, "params": L * d, "options": [], "chosen": {"m": L}}
        bm = match_pt_length(L, d, s, m=opts.prefix_length)
        if opts.r is not None and opts.r != bm.chosen.r:
            raise UserError(
                f"--r {opts.r} does not give PT-{L}'s budget with m={bm.chosen.m} (needs r={bm.chosen.r})",
                hint="drop --r or --match-pt-length",
            )
        info = {
            "pt_length": L,
            "params": L * d,
            "d": d,
            "s": s,
            "chosen": {"m": bm.chosen.m, "r": bm.chosen.r},
            "options": [{"m": o.m, "r": o.r} for o in bm.options],
            "message": bm.describe(),
        }
        return bm.chosen.m, bm.chosen.r, info
    m = opts.prefix_length or DEFAULT_M[opts.method]
    return m, (opts.r or DEFAULT_R) if opts.method == "dept" else None, None


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# how the task reaches the model
CLASSIFIER = "classifier"  # the task registry's classification data and metrics, a classifier head
TEXT2TEXT = "text2text"  # a registered text-to-text task (t2t/...): seq2seq loss, generation eval
TEXT2TEXT_HOOK = "text2text-hook"  # fallback when no t2t/ task exists (mergekit_lab.prompt.text2text)


def resolve_task(task, is_encoder_decoder: bool):
    """(task, format): encoder-decoder models get the task's ``t2t/`` form when it is registered."""
    from mergekit_lab.tasks import get_task

    if task.family == "seq2seq":
        if not is_encoder_decoder:
            raise UserError(f"task {task.name} is text-to-text and needs an encoder-decoder model (T5)")
        return task, TEXT2TEXT
    if task.family != "classification":
        raise UserError(
            f"prompt-tune trains on classification and text-to-text tasks, not {task.family} ({task.name})"
        )
    if is_encoder_decoder:
        try:
            return get_task(f"t2t/{task.name}"), TEXT2TEXT
        except UserError:
            from mergekit_lab.prompt.text2text import check_task

            check_task(task)
            return task, TEXT2TEXT_HOOK
    return task, CLASSIFIER


def load_base_model(model_settings, task, *, seed: int, tokenizer):
    """(model, task, format): a seq2seq LM (T5) for text-to-text, else the task's classifier."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from mergekit_lab.models import load_model_for_task, resolve_model_ref

    ref = resolve_model_ref(model_settings.name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(ref, trust_remote_code=bool(model_settings.trust_remote_code))
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of model {model_settings.name_or_path!r}: {e}") from None
    task, fmt = resolve_task(task, bool(getattr(cfg, "is_encoder_decoder", False)))
    if fmt == CLASSIFIER:
        return load_model_for_task(model_settings, task, seed=seed, tokenizer=tokenizer), task, fmt
    kw = {"trust_remote_code": bool(model_settings.trust_remote_code)}
    if model_settings.revision:
        kw["revision"] = model_settings.revision
    return AutoModelForSeq2SeqLM.from_pretrained(ref, **kw), task, fmt


def _data_fns(task, fmt: str, tokenizer):
    """(load_fn, collate, compute_loss, evaluate(model, ds, acc, bs)) for the task's format."""
    if fmt == TEXT2TEXT:
        from mergekit_lab.data import k_shot_indices, subsample

        def load_fn(task_, split, data, tok, *, max_samples=None, seed=42, k_shot=None):
            ds = task_.load(split, data.data_dir)
            if k_shot:
                ds = ds.select(k_shot_indices(ds["label"], k_shot, seed))
            ds = subsample(ds, max_samples, seed)
            return task_.encode(ds, tok, resolve_max_seq_length(task_, data))

        def evaluate(model, ds, acc, bs):
            return task.evaluate(
                model, ds, tokenizer, accelerator=acc, batch_size=bs, description=f"eval {task.name}"
            )

        return load_fn, task.collator(tokenizer), task.compute_loss, evaluate
    if fmt == TEXT2TEXT_HOOK:
        from mergekit_lab.prompt.text2text import (
            evaluate_t2t,
            load_t2t_data,
            make_t2t_collator,
            t2t_compute_loss,
        )

        collate = make_t2t_collator(tokenizer)

        def evaluate(model, ds, acc, bs):
            return evaluate_t2t(model, task, ds, collate, tokenizer, acc, bs)

        return load_t2t_data, collate, t2t_compute_loss, evaluate
    from mergekit_lab.data import load_task_data, make_collator
    from mergekit_lab.evaluation import evaluate as eval_cls
    from mergekit_lab.training import default_compute_loss

    collate = make_collator(tokenizer)

    def evaluate(model, ds, acc, bs):
        return eval_cls(model, task, ds, collate, acc, bs, description=f"eval {task.name}")

    return load_task_data, collate, functools.partial(default_compute_loss, task=task), evaluate


def prompt_tune(settings: PromptTuneSettings) -> dict:
    """Train a PT/DePT module on ``settings.data.task``; returns the results dict."""
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.prompt.build import build_prompt_model
    from mergekit_lab.prompt.io import save_prompt_module
    from mergekit_lab.prompt.optim import param_groups
    from mergekit_lab.results import RunOutput
    from mergekit_lab.runtime import log, make_accelerator, seed_everything
    from mergekit_lab.tasks import canonical_split, get_task
    from mergekit_lab.training import fit

    run, data, training, opts = settings.run, settings.data, settings.training, settings.prompt
    if run.output_dir is None:
        raise UserError("no output folder given", hint="pass --output-dir DIR")
    task = get_task(data.task)
    if opts.init_from is not None:
        from mergekit_lab.prompt.io import read_prompt_config

        read_prompt_config(opts.init_from)  # a missing or foreign folder fails before any loading
    acc = make_accelerator(run, training.gradient_accumulation_steps)
    seed_everything(run.seed)
    tokenizer = load_tokenizer(settings.model)
    base, task, fmt = load_base_model(settings.model, task, seed=run.seed, tokenizer=tokenizer)
    d = int(base.get_input_embeddings().weight.shape[1])
    s = resolve_max_seq_length(task, data)  # DePT's s: an unset --max-seq-length is the task default
    m, r, budget = resolve_shape(opts, d, s)
    if budget and budget.get("message"):
        log(budget["message"])
    maxpos = None if fmt != CLASSIFIER else _max_positions(base.config)
    if maxpos is not None and m + s > maxpos:
        raise UserError(
            f"prompt length {m} + max sequence length {s} exceeds the model's {maxpos} positions",
            hint=f"lower --max-seq-length to {maxpos - m} or --prefix-length",
        )

    load_fn, collate, compute_loss, evaluate = _data_fns(task, fmt, tokenizer)
    train_ds = load_fn(
        task, "train", data, tokenizer, max_samples=data.max_train_samples, seed=run.seed, k_shot=data.k_shot
    )
    eval_ds = load_fn(task, "validation", data, tokenizer, max_samples=data.max_eval_samples, seed=run.seed)

    model = build_prompt_model(
        base,
        opts.method,
        num_virtual_tokens=m,
        r=r or DEFAULT_R,
        lora_alpha=opts.lora_alpha,
        max_length=s,
        padding_mode=opts.padding_mode,
        init=opts.prompt_init,
        init_text=opts.init_text,
        tokenizer=tokenizer,
        seed=run.seed,
        init_from=opts.init_from,
        base_model_name_or_path=settings.model.name_or_path,
    )
    n_trainable = model.trainable_parameter_count()
    n_prompt = model.prompt_parameter_count()
    groups = param_groups(
        model,
        prompt_lr=training.learning_rate,
        lora_lr=opts.lora_embedding_lr,
        head_lr=opts.head_lr,
        weight_decay=training.weight_decay,
    )
    log(
        f"prompt-tune {opts.method} on {task.name}: m={m}"
        + (f", r={r}, s={s}" if r else "")
        + f"; {n_trainable:,} trainable parameters ({n_prompt:,} in the prompt module); "
        f"{len(train_ds)} train / {len(eval_ds)} validation examples"
    )

    counters = {"tokens": 0, "eval_seconds": 0.0}

    def counting_loss(mdl, batch):
        counters["tokens"] += int(batch["attention_mask"].sum())
        return compute_loss(mdl, batch)

    def evaluate_fn(mdl):
        t0 = time.perf_counter()
        out = evaluate(mdl, eval_ds, acc, training.per_device_eval_batch_size)
        counters["eval_seconds"] += time.perf_counter() - t0
        return out

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with RunOutput(
        run.output_dir, "prompt-tune", settings, overwrite=run.overwrite, resume=run.resume, accelerator=acc
    ) as out:
        result = fit(
            model,
            train_ds,
            training=training,
            run=run,
            workdir=out.tmp_dir,
            collate_fn=collate,
            evaluate_fn=evaluate_fn,
            metric_for_best=task.primary_metric,
            greater_is_better=task.greater_is_better,
            compute_loss=counting_loss,
            param_groups=groups,
            accelerator=acc,
            description=f"{opts.method} {task.name}",
        )
        unwrapped = acc.unwrap_model(model)
        best = next(
            (
                h
                for h in result.history
                if h.get("step") == result.best_step and any(k.startswith("eval_") for k in h)
            ),
            None,
        )
        metrics = {k[5:]: v for k, v in (best or {}).items() if k.startswith("eval_")}
        rows = [
            {
                "model": str(run.output_dir),
                "kind": opts.method,
                "task": task.name,
                "split": "validation",
                "metrics": metrics,
                "trainable_params": n_trainable,
            }
        ]
        all_metrics: dict[str, Any] = {"validation": metrics}
        if opts.test_split:
            split = canonical_split(opts.test_split)
            test_ds = load_fn(task, split, data, tokenizer, max_samples=data.max_eval_samples, seed=run.seed)
            test_metrics = evaluate(unwrapped, test_ds, acc, training.per_device_eval_batch_size)
            all_metrics[split] = test_metrics
            rows.append({**rows[0], "split": split, "metrics": test_metrics})
        train_s = max(result.train_seconds - counters["eval_seconds"], 1e-9)
        timing = {
            "steps": result.global_step,
            "train_seconds_without_eval": round(train_s, 3),
            "eval_seconds": round(counters["eval_seconds"], 3),
            "seconds_per_step": round(train_s / max(result.global_step, 1), 6),
            "train_tokens": counters["tokens"],
            "tokens_per_second": round(counters["tokens"] / train_s, 1),
            "samples_per_second": result.samples_per_second,
            "peak_cuda_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if torch.cuda.is_available()
            else None,
        }
        if acc.is_main_process:
            save_prompt_module(unwrapped, out.tmp_dir, base_model_name_or_path=settings.model.name_or_path)
        out.metrics = {**all_metrics, "train_loss": result.train_loss, "trainable_params": n_trainable}
        out.rows = rows
        out.artifacts = {
            "adapter": ".",
            "adapter_config": "adapter_config.json",
            "adapter_weights": "adapter_model.safetensors",
        }
        out.extra = {
            "task": {
                "name": task.name,
                "problem_type": task.problem_type,
                "labels": task.label_names,
                "format": fmt,
            },
            "prompt": {
                "method": opts.method,
                "m": m,
                "r": r,
                "s": s if opts.method == "dept" else None,
                "d": d,
                "lora_alpha": opts.lora_alpha if r else None,
                "scale": (opts.lora_alpha / r**0.5) if r else None,
                "padding_mode": opts.padding_mode if r else None,
                "prompt_init": "init_from" if opts.init_from else opts.prompt_init,
                "init_from": str(opts.init_from) if opts.init_from else None,
                "trainable_params": n_trainable,
                "prompt_params": n_prompt,
                "head_params": n_trainable - n_prompt,
                "match_pt_length": budget,
                "learning_rates": {g["name"]: g["lr"] for g in groups},
            },
            "timing": timing,
            "training": result.to_dict(),
            "train_examples": len(train_ds),
            "eval_examples": len(eval_ds),
        }
        data_out = out.results()
    if metrics:
        log(
            f"done: validation {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}; "
            f"{timing['seconds_per_step'] * 1000:.1f} ms/step -> {run.output_dir}"
        )
    return data_out


def load_prompt_model_for_task(model_settings, adapter_dir, task, *, tokenizer, seed: int = 42):
    """(model with the saved PT/DePT module, task, format) for evaluating ``adapter_dir`` on ``task``."""
    from mergekit_lab.prompt.io import load_prompt_module

    base, task, fmt = load_base_model(model_settings, task, seed=seed, tokenizer=tokenizer)
    return load_prompt_module(base, adapter_dir), task, fmt


def evaluate_prompt_adapter(
    model_settings,
    adapter_dir,
    task,
    split: str,
    data,
    *,
    batch_size: int = 64,
    accelerator=None,
    seed: int = 42,
) -> dict[str, float]:
    """Metrics of the PT/DePT module in ``adapter_dir`` on ``model_settings``'s model for one split.

    This is what ``mklab eval --model BASE --adapter DIR`` calls. Without a model name the base
    recorded in the adapter folder (``base_model_name_or_path``) is used."""
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.prompt.io import adapter_base_model

    if not model_settings.name_or_path:
        recorded = adapter_base_model(adapter_dir)
        if not recorded:
            raise UserError(f"no base model given for adapter {adapter_dir}", hint="pass --model BASE")
        model_settings = model_settings.model_copy(update={"name_or_path": recorded})
    tokenizer = load_tokenizer(model_settings)
    model, task, fmt = load_prompt_model_for_task(
        model_settings, adapter_dir, task, tokenizer=tokenizer, seed=seed
    )
    if accelerator is not None:
        model = model.to(accelerator.device)
    if model.is_dept and resolve_max_seq_length(task, data) > int(model.peft_config.max_length):
        # the low-rank update covers s positions: truncate as in training
        data = data.model_copy(update={"max_seq_length": int(model.peft_config.max_length)})
    load_fn, _, _, evaluate = _data_fns(task, fmt, tokenizer)
    ds = load_fn(task, split, data, tokenizer, max_samples=data.max_eval_samples, seed=seed)
    return evaluate(model, ds, accelerator, batch_size)


__all__ = ["evaluate_prompt_adapter", "load_prompt_model_for_task", "prompt_tune", "resolve_shape"]
