"""Runtime helpers: the Accelerator, seeding, rank-0 logging and rich progress bars."""

from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mergekit_lab.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from mergekit_lab.settings import RunSettings

console = Console(stderr=True)
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str, *, force: bool = False) -> None:
    """Print an info line on rank 0 (stderr), unless quiet."""
    if (not _QUIET or force) and is_main_process():
        console.print(msg, highlight=False)


def warn(msg: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_accelerator(run: RunSettings, gradient_accumulation_steps: int = 1) -> Accelerator:
    """One Accelerator for CPU, one GPU or many processes (torchrun / accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[run.precision]
    cuda = torch.cuda.is_available() and not run.cpu_only
    if run.precision == "fp16" and not cuda:
        raise UserError("precision fp16 needs a CUDA GPU", hint="use --precision bf16 or fp32 on the CPU")
    if run.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16", hint="use --precision fp16 or fp32")
    return Accelerator(
        mixed_precision=mixed,
        cpu=not cuda,
        gradient_accumulation_steps=gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def make_progress(transient: bool = False, **_: Any) -> Progress:
    """A rich progress bar, shown on rank 0 only and hidden when quiet."""
    disable = _QUIET or not is_main_process()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=transient,
    )


@contextmanager
def progress(description: str, total: int | None, transient: bool = True):
    """Context manager yielding ``advance(n=1, **info)`` for a single-task progress bar."""
    bar = make_progress(transient=transient)
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **info: Any) -> None:
            text = "  ".join(f"{k} {v}" for k, v in info.items())
            bar.update(task, advance=n, info=text)

        yield advance


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process (and CUDA peak when a GPU is used)."""
    rss = None
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = ru / 1024.0 if sys.platform != "darwin" else ru / (1024.0 * 1024.0)
    except (ImportError, OSError):  # pragma: no cover
        pass
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"rss": round(rss, 1) if rss else None, "cuda": round(cuda, 1) if cuda else None}
