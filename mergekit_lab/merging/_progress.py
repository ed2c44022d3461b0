"""A progress bar that uses the project's rank-0 rich progress when it exists."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("mergekit_lab.merging")


def log(msg: str) -> None:
    try:
        from mergekit_lab.runtime import log as _log  # type: ignore

        _log(msg)
    except Exception:  # foundation not importable: plain logging
        logger.info(msg)


def track(it: Iterable[T], total: int | None, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with a transient rich progress bar on stderr (only when stderr is a terminal)."""
    if not enabled or not sys.stderr.isatty():
        yield from it
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=total)
        for x in it:
            yield x
            prog.advance(task)
