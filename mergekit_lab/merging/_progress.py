"""Progress bars and info lines through the project's rank-0 runtime helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("mergekit_lab.merging")


def log(msg: str) -> None:
    try:
        from mergekit_lab.runtime import log as _log
    except ImportError:  # pragma: no cover
        logger.info(msg)
        return
    _log(msg)


def track(it: Iterable[T], total: int | None, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with the runtime's rich progress bar (rank 0, hidden when quiet or disabled)."""
    if not enabled:
        yield from it
        return
    from mergekit_lab.runtime import progress

    with progress(description, total=total) as advance:
        for x in it:
            yield x
            advance()
