"""Run functions of the four distillation commands (settings in, artifacts + results.json out)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mergekit_lab.distill.settings import (
    BinarizeSettings,
    CountTokensSettings,
    DistillSettings,
    ExtractStudentSettings,
    FitMlmHeadSettings,
)
from mergekit_lab.errors import UserError


def _results(output: Path, command: str, settings, start: float, **extra) -> dict:
    """results.json for the data commands (their folder itself was written atomically)."""
    from mergekit_lab.results import SCHEMA_VERSION, git_commit, package_versions, write_json_atomic
    from mergekit_lab.runtime import peak_memory_mb

    data = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "settings": settings.model_dump(mode="json"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "wall_seconds": round(time.time() - start, 3),
        "peak_memory_mb": peak_memory_mb(),
        "metrics": extra.pop("metrics", {}),
        "rows": [],
        "artifacts": extra.pop("artifacts", {}),
        **extra,
    }
    write_json_atomic(Path(output) / "results.json", data)
    return data


def _token_progress(description: str, quiet: bool):
    """A rich progress bar showing documents and tokens/s; returns (context, callback)."""
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from mergekit_lab.runtime import console, set_quiet

    set_quiet(quiet)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[docs]:,} docs"),
        TextColumn("{task.completed:,.0f} tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )
    task = bar.add_task(description, total=None, docs=0, rate="")
    t0 = time.time()
    docs = [0]

    def update(n_docs: int, n_tokens: int) -> None:
        docs[0] += n_docs
        done = bar.tasks[0].completed + n_tokens
        rate = done / max(time.time() - t0, 1e-9)
        bar.update(task, completed=done, docs=docs[0], rate=f"{rate:,.0f} tokens/s")

    return bar, update


def run_binarize(settings: BinarizeSettings) -> dict:
    from mergekit_lab.distill.binarize import TextSource, binarize, combine
    from mergekit_lab.runtime import log

    o = settings.binarize
    if o.output is None:
        raise UserError("binarize needs --output FOLDER")
    start = time.time()
    if o.combine:
        header = combine(o.combine, o.output, overwrite=o.overwrite)
    else:
        source = TextSource(files=o.files, disk=o.from_disk, dataset=o.dataset, dataset_config=o.dataset_config,
                            split=o.split, text_field=o.text_field, max_documents=o.max_documents)
        bar, update = _token_progress("binarize", o.quiet)
        with bar:
            header = binarize(source, o.tokenizer, o.output, num_proc=o.num_proc, wrap=o.wrap,
                              chunk_size=o.chunk_size, overwrite=o.overwrite, progress=update)
    secs = time.time() - start
    metrics = {"num_sequences": header["num_sequences"], "num_tokens": header["num_tokens"],
               "tokens_per_second": header["num_tokens"] / max(secs, 1e-9)}
    _results(o.output, "binarize", settings, start, metrics=metrics,
             artifacts={"tokens": "tokens.npy", "offsets": "offsets.npy", "header": "header.json"})
    log(f"binarized {header['num_sequences']:,} sequences, {header['num_tokens']:,} tokens "
        f"({metrics['tokens_per_second']:,.0f} tokens/s) -> {o.output}")
    return header


def run_count_tokens(settings: CountTokensSettings) -> dict:
    from mergekit_lab.distill.binarize import count_tokens
    from mergekit_lab.runtime import log

    o = settings.count
    if o.data is None or o.output is None:
        raise UserError("count-tokens needs --data (binarized folder) and --output FOLDER")
    start = time.time()
    bar, update = _token_progress("count-tokens", o.quiet)
    with bar:
        header = count_tokens(o.data, o.output, overwrite=o.overwrite, progress=update)
    _results(o.output, "count-tokens", settings, start, metrics={"num_tokens": header["num_tokens"]},
             artifacts={"counts": "counts.npy", "header": "header.json"})
    log(f"counted {header['num_tokens']:,} tokens over {header['vocab_size']:,} ids -> {o.output}")
    return header


def run_extract_student(settings: ExtractStudentSettings) -> dict:
    from mergekit_lab.distill.io import atomic_output_dir
    from mergekit_lab.distill.student import extract_student, get_layers, load_lm, save_student
    from mergekit_lab.runtime import log, set_quiet

    o = settings.extract
    set_quiet(o.quiet)
    if o.teacher is None or o.output is None:
        raise UserError("extract-student needs --teacher and --output")
    start = time.time()
    teacher = load_lm(o.teacher)
    student, layers = extract_student(teacher, num_layers=o.num_layers, layers=o.layers or None, arch=o.student_arch)
    info = {"teacher": o.teacher, "teacher_layers": layers, "teacher_num_layers": len(get_layers(teacher)),
            "student_arch": type(student).__name__}
    with atomic_output_dir(o.output, overwrite=o.overwrite) as tmp:
        save_student(student, tmp, tokenizer_ref=o.teacher, extra=info)
    n_params = sum(p.numel() for p in student.parameters())
    _results(o.output, "extract-student", settings, start, metrics={"parameters": n_params}, artifacts={"model": "."},
             student=info)
    log(f"student {type(student).__name__} with teacher layers {layers} ({n_params:,} parameters) -> {o.output}")
    return info


def run_fit_mlm_head(settings: FitMlmHeadSettings) -> dict:
    from mergekit_lab.distill.io import atomic_output_dir
    from mergekit_lab.distill.mlm_head import fit_mlm_head
    from mergekit_lab.distill.student import save_student
    from mergekit_lab.runtime import log, progress, set_quiet

    o = settings.head
    set_quiet(o.quiet)
    if o.model is None or o.data is None or o.output is None:
        raise UserError("fit-mlm-head needs --model, --data (binarized corpus) and --output")
    if o.output.exists() and not o.overwrite:
        raise UserError(f"output {o.output} already exists", hint="choose another path or pass --overwrite")
    start = time.time()
    with progress("fit-mlm-head", o.max_steps) as advance:
        model, stats = fit_mlm_head(o.model, o.data, token_counts=o.token_counts, max_steps=o.max_steps,
                                    batch_size=o.batch_size, max_seq_length=o.max_seq_length,
                                    learning_rate=o.learning_rate, unfreeze_layers=o.unfreeze_layers, seed=o.seed,
                                    progress=lambda step, loss: advance(1, mlm_loss=f"{loss:.3f}"))
    with atomic_output_dir(o.output, overwrite=o.overwrite) as tmp:
        save_student(model, tmp, tokenizer_ref=o.model, extra={"base_model": o.model, "mlm_head": stats})
    _results(o.output, "fit-mlm-head", settings, start, metrics=stats, artifacts={"model": "."})
    log(f"MLM head trained for {stats['steps']} steps: loss {stats['first_mlm_loss']:.3f} -> "
        f"{stats['final_mlm_loss']:.3f} -> {o.output}")
    return stats


def run_distill(settings: DistillSettings) -> dict:
    from mergekit_lab.distill.evaluate import lm_perplexity
    from mergekit_lab.distill.trainer import distill, loss_weights
    from mergekit_lab.results import RunOutput
    from mergekit_lab.runtime import log, make_accelerator

    run = settings.run
    if run.output_dir is None:
        raise UserError("distill needs --output-dir")
    acc = make_accelerator(run, settings.training.gradient_accumulation_steps)
    with RunOutput(run.output_dir, "distill", settings, overwrite=run.overwrite, resume=run.resume,
                   accelerator=acc) as out:
        student, result = distill(settings, out.tmp_dir, accelerator=acc)
        if settings.data.eval_data is not None and acc.is_main_process:
            result.eval = lm_perplexity(student, settings.data.eval_data, max_len=min(settings.data.max_seq_length, 512),
                                        max_sequences=settings.data.max_eval_sequences, seed=run.seed)
            log(f"eval: perplexity {result.eval['perplexity']:.2f} on {result.eval['predicted_tokens']:,} tokens")
        if acc.is_main_process:
            student.save_pretrained(out.tmp_dir, safe_serialization=True)
            _copy_tokenizer(settings, out.tmp_dir)
            shutil.rmtree(out.tmp_dir / "checkpoints", ignore_errors=True)
        out.metrics = {"train": result.final_losses, "eval": result.eval}
        out.artifacts = {"model": ".", "train_log": "train_log.jsonl"}
        out.extra = {"distill": {
            "global_step": result.global_step, "epochs": result.epochs_done, "train_seconds": result.train_seconds,
            "sequences_seen": result.sequences_seen, "tokens_seen": result.tokens_seen,
            "resumed_from": result.resumed_from, "loss_weights": loss_weights(settings).as_dict(),
            "num_processes": acc.num_processes,
        }}
        data = out.results()
    log(f"done: {result.global_step} steps, {result.tokens_seen:,} tokens -> {run.output_dir}")
    return data


def _copy_tokenizer(settings: DistillSettings, dest: Path) -> None:
    from transformers import AutoTokenizer

    from mergekit_lab.distill.io import resolve_ref

    for ref in (settings.models.student, settings.models.teacher):
        try:
            AutoTokenizer.from_pretrained(resolve_ref(ref)).save_pretrained(dest)
            return
        except (OSError, ValueError, TypeError):
            continue
